//! The D-Bus face of vmbeamd: the manager, one object per job (UDisks2.Job-like), and the
//! hook entry point. Every method translates into the operation model and runs libvirt or
//! pool work on blocking threads, never on the dispatch thread.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::libvirt_conn::Conn;
use tokio::sync::mpsc;
use tracing::{info, warn};
use virt::domain::Domain;
use virt::sys;
use vmbeam_bus::{BeamError, DomainRow, JOBS_PATH};
use vmbeam_core::job::MigrateOptions;
use vmbeam_core::plan::RequestedMode;
use vmbeam_core::pool::{BeamPool, RecordStatus};
use vmbeam_core::{BeamMetadata, DomainFacts, Phase};
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::{OwnedObjectPath, OwnedValue};
use zbus::{interface, Connection, ObjectServer};

use crate::engine::{self, JobHandle, JobView};
use crate::hooks;
use crate::state::SharedCtx;

/// The caller's Unix user id (the message's sender, never the daemon's own).
async fn caller_uid(hdr: &Header<'_>, conn: &Connection) -> Result<u32, BeamError> {
    let sender = hdr
        .sender()
        .ok_or_else(|| BeamError::NotAuthorized("message without a sender".into()))?;
    let proxy = zbus::fdo::DBusProxy::new(conn)
        .await
        .map_err(BeamError::ZBus)?;
    proxy
        .get_connection_unix_user(sender.clone().into())
        .await
        .map_err(|e| BeamError::NotAuthorized(format!("cannot identify the caller: {e}")))
}

/// Root only (the hook's entry point).
async fn require_root(hdr: &Header<'_>, conn: &Connection, what: &str) -> Result<(), BeamError> {
    let uid = caller_uid(hdr, conn).await?;
    if uid != 0 {
        return Err(BeamError::NotAuthorized(format!(
            "{what} needs root (caller uid {uid})"
        )));
    }
    Ok(())
}

/// polkit action for migrations (and cancelling them).
pub const ACTION_MIGRATE: &str = "org.vmbeam.VMBeam1.migrate";
/// polkit action for enabling and disabling domains.
pub const ACTION_ENABLE: &str = "org.vmbeam.VMBeam1.enable";

/// Privileged operations: root, or a caller polkit authorizes for `action`. The subject is
/// the message's sender (its bus name), never the daemon itself.
async fn authorize(hdr: &Header<'_>, conn: &Connection, action: &str) -> Result<(), BeamError> {
    let uid = caller_uid(hdr, conn).await?;
    if uid == 0 {
        return Ok(());
    }
    let sender = hdr
        .sender()
        .ok_or_else(|| BeamError::NotAuthorized("message without a sender".into()))?
        .to_string();
    let mut subject_details: HashMap<&str, zbus::zvariant::Value<'_>> = HashMap::new();
    subject_details.insert("name", zbus::zvariant::Value::from(sender.as_str()));
    let details: HashMap<&str, &str> = HashMap::new();
    let reply = conn
        .call_method(
            Some("org.freedesktop.PolicyKit1"),
            "/org/freedesktop/PolicyKit1/Authority",
            Some("org.freedesktop.PolicyKit1.Authority"),
            "CheckAuthorization",
            &(
                ("system-bus-name", subject_details),
                action,
                details,
                1u32,
                "",
            ),
        )
        .await
        .map_err(|e| {
            BeamError::NotAuthorized(format!(
                "uid {uid} is not root and polkit could not authorize {action}: {e}"
            ))
        })?;
    let (authorized, _challenge, _details): (bool, bool, HashMap<String, String>) = reply
        .body()
        .deserialize()
        .map_err(|e| BeamError::NotAuthorized(format!("polkit's answer: {e}")))?;
    if authorized {
        Ok(())
    } else {
        Err(BeamError::NotAuthorized(format!(
            "polkit does not authorize uid {uid} for {action}"
        )))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BeamError> + Send + 'static,
) -> Result<T, BeamError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BeamError::Failed(format!("worker: {e}")))?
}

fn lv(e: virt::error::Error) -> BeamError {
    BeamError::Libvirt(e.message().to_string())
}

fn opt_bool(o: &HashMap<String, OwnedValue>, k: &str) -> Result<bool, BeamError> {
    match o.get(k) {
        None => Ok(false),
        Some(v) => bool::try_from(v)
            .map_err(|_| BeamError::InvalidArgs(format!("option {k} must be a boolean"))),
    }
}

fn opt_str(o: &HashMap<String, OwnedValue>, k: &str) -> Result<Option<String>, BeamError> {
    match o.get(k) {
        None => Ok(None),
        Some(v) => <&str>::try_from(v)
            .map(|s| Some(s.to_string()))
            .map_err(|_| BeamError::InvalidArgs(format!("option {k} must be a string"))),
    }
}

/// Translates D-Bus options into the operation model.
pub fn parse_options(
    o: &HashMap<String, OwnedValue>,
) -> Result<(MigrateOptions, Option<String>), BeamError> {
    const KNOWN: &[&str] = &[
        "mode",
        "live",
        "persistent",
        "undefine-source",
        "migrate-uri",
        "timeout",
        "verbose",
        "p2p",
        "tls",
    ];
    if let Some(k) = o.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(BeamError::InvalidArgs(format!(
            "unknown option '{k}' (known: {})",
            KNOWN.join(", ")
        )));
    }
    let mode = match opt_str(o, "mode")?.as_deref() {
        None | Some("auto") => RequestedMode::Auto,
        Some("zero-copy") => RequestedMode::RequireZeroCopy,
        Some("traditional") => RequestedMode::ForceTraditional,
        Some(other) => {
            return Err(BeamError::InvalidArgs(format!(
                "mode '{other}': use auto, zero-copy or traditional"
            )))
        }
    };
    let timeout_secs = match o.get("timeout") {
        None => None,
        Some(v) => Some(
            u32::try_from(v)
                .map_err(|_| BeamError::InvalidArgs("option timeout must be u (seconds)".into()))?
                as u64,
        ),
    };
    Ok((
        MigrateOptions {
            mode,
            live: opt_bool(o, "live")?,
            p2p: true,
            persistent: opt_bool(o, "persistent")?,
            undefine_source: opt_bool(o, "undefine-source")?,
            timeout_secs,
            verbose: opt_bool(o, "verbose")?,
            tls: opt_bool(o, "tls")?,
        },
        opt_str(o, "migrate-uri")?,
    ))
}

/// The daemon's jobs by id: (object path, handle).
pub type JobTable = Arc<Mutex<BTreeMap<u64, (String, Arc<JobHandle>)>>>;

/// The manager object.
pub struct Manager {
    pub ctx: SharedCtx,
    pub jobs: JobTable,
    pub next_job: AtomicU64,
}

#[interface(name = "org.vmbeam.VMBeam1.Manager")]
impl Manager {
    /// Starts a migration and returns its job object.
    async fn migrate(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(object_server)] server: &ObjectServer,
        domain: String,
        dest_uri: String,
        options: HashMap<String, OwnedValue>,
    ) -> Result<OwnedObjectPath, BeamError> {
        authorize(&hdr, conn, ACTION_MIGRATE).await?;
        let (opts, migrate_uri) = parse_options(&options)?;
        if domain.is_empty() || dest_uri.is_empty() {
            return Err(BeamError::InvalidArgs(
                "domain and destination URI are required".into(),
            ));
        }
        let id = self.next_job.fetch_add(1, Ordering::SeqCst);
        let path = OwnedObjectPath::try_from(format!("{JOBS_PATH}/{id}"))
            .map_err(|e| BeamError::Failed(e.to_string()))?;
        let (tx, mut rx) = mpsc::unbounded_channel::<()>();
        let handle = Arc::new(JobHandle::new(
            id,
            &domain,
            &dest_uri,
            Box::new(move || {
                let _ = tx.send(());
            }),
        ));
        // The "already running" check and the registration are one step under one lock:
        // zbus runs each call in its own task, and an .await between them let a second
        // Migrate of the same domain pass (whose failure path could then undo the first
        // job's state).
        let expired = register_job(&self.jobs, &domain, id, &path, &handle)?;
        if let Err(e) = server
            .at(
                path.clone(),
                JobObj {
                    handle: handle.clone(),
                    ctx: self.ctx.clone(),
                },
            )
            .await
        {
            self.jobs.lock().expect("lock").remove(&id);
            return Err(BeamError::ZBus(e));
        }
        for p in expired {
            let _ = server.remove::<JobObj, _>(p.as_str()).await;
        }
        // Property changes follow the job's updates.
        let server2 = server.clone();
        let p2 = path.clone();
        tokio::spawn(async move {
            let mut last = JobView::default();
            while rx.recv().await.is_some() {
                while rx.try_recv().is_ok() {}
                let Ok(iref) = server2.interface::<_, JobObj>(p2.clone()).await else {
                    break;
                };
                let now = iref.get().await.handle.view.lock().expect("lock").clone();
                emit_changes(&iref, &last, &now).await;
                last = now;
            }
        });
        let ctx = self.ctx.clone();
        let server3 = server.clone();
        let p3 = path.clone();
        let h2 = handle.clone();
        info!(job = id, %domain, %dest_uri, mode = ?opts.mode, "migration requested");
        tokio::spawn(async move {
            let h3 = h2.clone();
            let outcome = tokio::task::spawn_blocking(move || {
                engine::run(&ctx, &h3, &domain, &dest_uri, migrate_uri.as_deref(), &opts)
            })
            .await
            .unwrap_or_else(|e| Err(BeamError::Failed(format!("job thread: {e}"))));
            let (success, message, name) = match &outcome {
                Ok(m) => (true, m.clone(), String::new()),
                Err(e) => (
                    false,
                    beam_error_text(e),
                    zbus::DBusError::name(e).to_string(),
                ),
            };
            {
                let mut v = h2.view.lock().expect("lock");
                v.finished = Some(success);
                if success {
                    v.phase = Phase::Completed;
                    v.progress = 100;
                } else {
                    v.phase = if h2.cancelled.load(Ordering::SeqCst) {
                        Phase::Cancelled
                    } else {
                        Phase::Failed
                    };
                    v.error = message.clone();
                    v.error_name = name;
                }
            }
            (h2.notify)();
            if let Ok(iref) = server3.interface::<_, JobObj>(p3).await {
                // Give the property task a moment so Completed follows the last update.
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = JobObj::completed(iref.signal_emitter(), success, &message).await;
            }
        });
        Ok(path)
    }

    /// Makes a domain beam-enabled (its persistent definition).
    async fn enable(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        domain: String,
    ) -> Result<Vec<String>, BeamError> {
        authorize(&hdr, conn, ACTION_ENABLE).await?;
        let ctx = self.ctx.clone();
        blocking(move || set_enabled(&ctx, &domain, true)).await
    }

    /// Reverts `enable`.
    async fn disable(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        domain: String,
    ) -> Result<Vec<String>, BeamError> {
        authorize(&hdr, conn, ACTION_ENABLE).await?;
        let ctx = self.ctx.clone();
        blocking(move || set_enabled(&ctx, &domain, false)).await
    }

    /// The beam-enabled domains of this host.
    async fn list_domains(&self) -> Result<Vec<DomainRow>, BeamError> {
        let ctx = self.ctx.clone();
        blocking(move || list_domains(&ctx)).await
    }

    /// Whether zero-copy to `dest_uri` is possible (proven through the pool).
    async fn co_location(&self, dest_uri: String) -> Result<(bool, String, String), BeamError> {
        let ctx = self.ctx.clone();
        blocking(move || {
            let c = engine::probe_destination(&ctx, &dest_uri, None)?;
            let id = &ctx.cfg.identity;
            Ok(match (c.report, c.detail) {
                (Some(r), _) => {
                    let ok =
                        r.cloud == id.cloud && r.proof == vmbeam_core::plan::ProofStatus::Proven;
                    let why = if r.cloud != id.cloud {
                        format!(
                            "{} is in virtual IaaS cloud '{}', not '{}'",
                            r.host_id, r.cloud, id.cloud
                        )
                    } else if ok {
                        format!("{} shares the beam pool (proven)", r.host_id)
                    } else {
                        format!("{} answered but the proof failed: {:?}", r.host_id, r.proof)
                    };
                    (ok, r.host_id.to_string(), why)
                }
                (None, d) => (
                    false,
                    String::new(),
                    d.unwrap_or_else(|| "no answer".into()),
                ),
            })
        })
        .await
    }

    /// The daemon's view: identity, pool files, jobs.
    async fn status(&self) -> Result<Vec<(String, String)>, BeamError> {
        let ctx = self.ctx.clone();
        let jobs: Vec<(String, JobView)> = self
            .jobs
            .lock()
            .expect("lock")
            .values()
            .map(|(p, h)| (p.clone(), h.view.lock().expect("lock").clone()))
            .collect();
        blocking(move || {
            let id = &ctx.cfg.identity;
            let mut out = vec![
                ("host".to_string(), id.host_id.to_string()),
                ("cloud".to_string(), id.cloud.to_string()),
                ("pool".to_string(), id.pool_dir.display().to_string()),
                ("libvirt-host-uuid".to_string(), ctx.libvirt_uuid.clone()),
            ];
            let pool = BeamPool::new(&id.pool_dir);
            for e in pool.list().map_err(|e| BeamError::Failed(e.to_string()))? {
                let rec = match &e.record {
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
                out.push((
                    "pool-file".into(),
                    format!(
                        "{} size={} {rec}",
                        e.file_name,
                        e.size
                            .map(|s| s.to_string())
                            .unwrap_or_else(|| "missing".into())
                    ),
                ));
            }
            for (p, v) in jobs {
                out.push((
                    "job".into(),
                    format!(
                        "{p} {} -> {} phase={} progress={}% mode={}",
                        v.domain,
                        v.destination,
                        v.phase.as_str(),
                        v.progress,
                        v.mode
                    ),
                ));
            }
            Ok(out)
        })
        .await
    }

    /// Paths of the jobs this daemon knows.
    #[zbus(property)]
    async fn jobs(&self) -> Vec<OwnedObjectPath> {
        self.jobs
            .lock()
            .expect("lock")
            .values()
            .filter_map(|(p, _)| OwnedObjectPath::try_from(p.clone()).ok())
            .collect()
    }

    /// This cloud VM's host id.
    #[zbus(property)]
    async fn host_id(&self) -> String {
        self.ctx.cfg.identity.host_id.to_string()
    }

    /// Its virtual IaaS cloud.
    #[zbus(property)]
    async fn cloud(&self) -> String {
        self.ctx.cfg.identity.cloud.to_string()
    }
}

/// How many finished jobs stay on the bus (for clients that look after the fact).
pub const KEEP_FINISHED_JOBS: usize = 32;

/// Drops the oldest finished jobs beyond [`KEEP_FINISHED_JOBS`]; returns their paths.
/// Registers job `id` for `domain` unless a migration of `domain` is still running, in one
/// step under the table's lock; returns the object paths of finished jobs that expired.
fn register_job(
    table: &JobTable,
    domain: &str,
    id: u64,
    path: &OwnedObjectPath,
    handle: &Arc<JobHandle>,
) -> Result<Vec<String>, BeamError> {
    let mut jobs = table.lock().expect("lock");
    if jobs.values().any(|(_, j)| {
        let v = j.view.lock().expect("lock");
        v.domain == domain && v.finished.is_none()
    }) {
        return Err(BeamError::Busy(format!(
            "a migration of {domain} is already running"
        )));
    }
    jobs.insert(id, (path.to_string(), handle.clone()));
    Ok(expire_jobs(&mut jobs))
}

fn expire_jobs(jobs: &mut BTreeMap<u64, (String, Arc<JobHandle>)>) -> Vec<String> {
    let finished: Vec<u64> = jobs
        .iter()
        .filter(|(_, (_, h))| h.view.lock().expect("lock").finished.is_some())
        .map(|(id, _)| *id)
        .collect();
    let excess = finished.len().saturating_sub(KEEP_FINISHED_JOBS);
    finished[..excess]
        .iter()
        .filter_map(|id| jobs.remove(id).map(|(p, _)| p))
        .collect()
}

/// The text of a typed error (without the D-Bus name).
pub fn beam_error_text(e: &BeamError) -> String {
    match e {
        BeamError::ZBus(z) => z.to_string(),
        BeamError::NoSuchDomain(s)
        | BeamError::NotBeamEnabled(s)
        | BeamError::CannotEnable(s)
        | BeamError::ZeroCopyRefused(s)
        | BeamError::TicketRefused(s)
        | BeamError::InvalidArgs(s)
        | BeamError::NotAuthorized(s)
        | BeamError::Busy(s)
        | BeamError::Libvirt(s)
        | BeamError::MigrationFailed(s)
        | BeamError::NoSuchJob(s)
        | BeamError::Failed(s) => s.clone(),
    }
}

async fn emit_changes(iref: &zbus::object_server::InterfaceRef<JobObj>, a: &JobView, b: &JobView) {
    let em = iref.signal_emitter();
    let obj = iref.get().await;
    if a.phase != b.phase {
        let _ = obj.phase_changed(em).await;
    }
    if a.timeline != b.timeline {
        let _ = obj.timeline_changed(em).await;
    }
    if a.progress != b.progress {
        let _ = obj.progress_changed(em).await;
    }
    if a.bytes_transferred != b.bytes_transferred {
        let _ = obj.bytes_transferred_changed(em).await;
    }
    if a.downtime_ms != b.downtime_ms {
        let _ = obj.downtime_changed(em).await;
    }
    if a.total_ms != b.total_ms {
        let _ = obj.total_time_changed(em).await;
    }
    if a.mode != b.mode {
        let _ = obj.mode_changed(em).await;
    }
    if a.mode_reason != b.mode_reason {
        let _ = obj.mode_reason_changed(em).await;
    }
    if a.error != b.error {
        let _ = obj.error_changed(em).await;
        let _ = obj.error_name_changed(em).await;
    }
}

fn set_enabled(ctx: &SharedCtx, domain: &str, enable: bool) -> Result<Vec<String>, BeamError> {
    let conn = Conn::open(&ctx.cfg.libvirt_uri).map_err(lv)?;
    let dom = Domain::lookup_by_name(&conn, domain)
        .map_err(|_| BeamError::NoSuchDomain(domain.into()))?;
    if !dom.is_persistent().map_err(lv)? {
        return Err(BeamError::InvalidArgs(format!(
            "{domain} is transient: define it first (virsh define)"
        )));
    }
    let xml = dom.get_xml_desc(sys::VIR_DOMAIN_XML_INACTIVE).map_err(lv)?;
    let id = &ctx.cfg.identity;
    let rewrite = if enable {
        let existing = BeamMetadata::from_domain_xml(&xml)
            .map_err(|e| BeamError::InvalidArgs(e.to_string()))?;
        let meta = BeamMetadata {
            cloud: id.cloud.clone(),
            pool: id.pool_dir.clone(),
            owner: id.host_id.clone(),
            generation: existing.map(|m| m.generation).unwrap_or(0),
            pool_file: None,
        };
        vmbeam_core::transform::enable(&xml, &meta, &ctx.cfg.qmp_dir)
    } else {
        vmbeam_core::transform::disable(&xml)
    }
    .map_err(|e| BeamError::CannotEnable(e.to_string()))?;
    if rewrite.changes.is_empty() {
        return Ok(vec![format!(
            "{domain} is already {}",
            if enable {
                "beam-enabled"
            } else {
                "not beam-enabled"
            }
        )]);
    }
    Domain::define_xml(&conn, &rewrite.xml).map_err(lv)?;
    let mut out: Vec<String> = rewrite.changes.iter().map(|c| c.to_string()).collect();
    if dom.is_active().unwrap_or(false) {
        out.push(format!(
            "{domain} is running: the change applies at its next start"
        ));
    }
    Ok(out)
}

fn list_domains(ctx: &SharedCtx) -> Result<Vec<DomainRow>, BeamError> {
    let conn = Conn::open(&ctx.cfg.libvirt_uri).map_err(lv)?;
    let pool = BeamPool::new(&ctx.cfg.identity.pool_dir);
    let mut rows = Vec::new();
    let mut live = HashSet::new();
    for d in conn.list_all_domains(0).map_err(lv)? {
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

/// One migration job.
pub struct JobObj {
    pub handle: Arc<JobHandle>,
    pub ctx: SharedCtx,
}

#[interface(name = "org.vmbeam.VMBeam1.Job")]
impl JobObj {
    /// Cancels the migration (libvirt's job abort); the guest keeps running on the source.
    async fn cancel(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), BeamError> {
        authorize(&hdr, conn, ACTION_MIGRATE).await?;
        let (domain, finished) = {
            let v = self.handle.view.lock().expect("lock");
            (v.domain.clone(), v.finished.is_some())
        };
        if finished {
            return Err(BeamError::InvalidArgs("the job has already ended".into()));
        }
        self.handle.cancelled.store(true, Ordering::SeqCst);
        let uri = self.ctx.cfg.libvirt_uri.clone();
        blocking(move || {
            crate::libvirt_job::abort(&uri, &domain).map_err(|e| BeamError::Libvirt(e.to_string()))
        })
        .await
    }

    /// Emitted once when the job ends.
    #[zbus(signal)]
    async fn completed(
        emitter: &SignalEmitter<'_>,
        success: bool,
        message: &str,
    ) -> zbus::Result<()>;

    #[zbus(property)]
    async fn domain(&self) -> String {
        self.handle.view.lock().expect("lock").domain.clone()
    }
    #[zbus(property)]
    async fn destination(&self) -> String {
        self.handle.view.lock().expect("lock").destination.clone()
    }
    #[zbus(property)]
    async fn phase(&self) -> String {
        self.handle
            .view
            .lock()
            .expect("lock")
            .phase
            .as_str()
            .to_string()
    }
    #[zbus(property)]
    async fn progress(&self) -> u32 {
        self.handle.view.lock().expect("lock").progress
    }
    #[zbus(property)]
    async fn bytes_transferred(&self) -> u64 {
        self.handle.view.lock().expect("lock").bytes_transferred
    }
    #[zbus(property)]
    async fn downtime(&self) -> u64 {
        self.handle.view.lock().expect("lock").downtime_ms
    }
    #[zbus(property)]
    async fn total_time(&self) -> u64 {
        self.handle.view.lock().expect("lock").total_ms
    }
    #[zbus(property)]
    async fn mode(&self) -> String {
        self.handle.view.lock().expect("lock").mode.clone()
    }
    #[zbus(property)]
    async fn mode_reason(&self) -> String {
        self.handle.view.lock().expect("lock").mode_reason.clone()
    }
    #[zbus(property)]
    async fn error(&self) -> String {
        self.handle.view.lock().expect("lock").error.clone()
    }
    /// Milliseconds since the job started at which each step began.
    #[zbus(property)]
    async fn timeline(&self) -> Vec<(String, u64)> {
        self.handle.view.lock().expect("lock").timeline.clone()
    }
    #[zbus(property)]
    async fn error_name(&self) -> String {
        self.handle.view.lock().expect("lock").error_name.clone()
    }
}

/// The hook's entry point.
pub struct HookObj {
    pub ctx: SharedCtx,
}

#[interface(name = "org.vmbeam.VMBeam1.Hook")]
impl HookObj {
    /// One hook invocation; answers within the configured hook timeout.
    async fn hook_event(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        args: Vec<String>,
        xml: String,
    ) -> Result<String, BeamError> {
        require_root(&hdr, conn, "HookEvent").await?;
        let ctx = self.ctx.clone();
        let limit = ctx.cfg.hook_timeout;
        match tokio::time::timeout(limit, blocking(move || hooks::handle(&ctx, &args, &xml))).await
        {
            Ok(r) => r,
            Err(_) => Err(BeamError::Failed(format!(
                "hook event not handled within {limit:?}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_translate_into_the_operation_model() {
        let ov = |v: zbus::zvariant::Value<'_>| OwnedValue::try_from(v).unwrap();
        let mut o = HashMap::new();
        o.insert("mode".to_string(), ov("zero-copy".into()));
        o.insert("live".to_string(), ov(true.into()));
        o.insert("timeout".to_string(), ov(30u32.into()));
        let (m, uri) = parse_options(&o).unwrap();
        assert_eq!(m.mode, RequestedMode::RequireZeroCopy);
        assert!(m.live && !m.persistent);
        assert_eq!(m.timeout_secs, Some(30));
        assert_eq!(uri, None);
        o.insert("bogus".to_string(), ov(true.into()));
        assert!(matches!(parse_options(&o), Err(BeamError::InvalidArgs(_))));
        let mut o = HashMap::new();
        o.insert("mode".to_string(), ov("fast".into()));
        assert!(matches!(parse_options(&o), Err(BeamError::InvalidArgs(_))));
        let mut o = HashMap::new();
        o.insert("live".to_string(), ov("yes".into()));
        assert!(matches!(parse_options(&o), Err(BeamError::InvalidArgs(_))));
    }

    #[test]
    fn concurrent_migrations_of_one_domain_register_one_job() {
        // Many callers at once, as zbus runs each Migrate in its own task: exactly one
        // registers per domain while it runs; another domain is not held up; once the job
        // finished, the domain can migrate again.
        let table: JobTable = Arc::new(Mutex::new(BTreeMap::new()));
        let start = Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8u64)
            .map(|id| {
                let (table, start) = (table.clone(), start.clone());
                std::thread::spawn(move || {
                    let domain = if id == 7 { "other" } else { "web1" };
                    let path = OwnedObjectPath::try_from(format!("{JOBS_PATH}/{id}")).unwrap();
                    let handle = Arc::new(JobHandle::new(id, domain, "qemu:///x", Box::new(|| {})));
                    start.wait();
                    register_job(&table, domain, id, &path, &handle).map(|_| handle)
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let won: Vec<&Arc<JobHandle>> = results[..7]
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .collect();
        assert_eq!(won.len(), 1, "exactly one Migrate of web1 registers");
        for r in results[..7].iter().filter_map(|r| r.as_ref().err()) {
            assert!(
                matches!(r, BeamError::Busy(m) if m.contains("already running")),
                "{r:?}"
            );
        }
        assert!(results[7].is_ok(), "another domain is not held up");
        assert_eq!(table.lock().unwrap().len(), 2);
        won[0].view.lock().unwrap().finished = Some(true);
        let path = OwnedObjectPath::try_from(format!("{JOBS_PATH}/9")).unwrap();
        let again = Arc::new(JobHandle::new(9, "web1", "qemu:///x", Box::new(|| {})));
        assert!(register_job(&table, "web1", 9, &path, &again).is_ok());
    }

    #[test]
    fn only_the_oldest_finished_jobs_expire() {
        let mut jobs = BTreeMap::new();
        for id in 0..(KEEP_FINISHED_JOBS as u64 + 5) {
            let h = Arc::new(JobHandle::new(id, "d", "u", Box::new(|| {})));
            if id != 1 {
                h.view.lock().unwrap().finished = Some(true);
            }
            jobs.insert(id, (format!("/j/{id}"), h));
        }
        let gone = expire_jobs(&mut jobs);
        // Job 1 is still running and stays; of the finished ones the oldest 4 go.
        assert_eq!(gone, vec!["/j/0", "/j/2", "/j/3", "/j/4"]);
        assert!(jobs.contains_key(&1));
        assert_eq!(jobs.len(), KEEP_FINISHED_JOBS + 1);
    }
}
