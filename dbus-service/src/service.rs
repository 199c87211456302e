//! The D-Bus face of vmbeamd: the manager, one object per job (UDisks2.Job-like), and the
//! hook entry point. Every method translates into the operation model and runs libvirt or
//! pool work on blocking threads, never on the dispatch thread.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{info, warn};
use vmbeam_bus::{BeamError, DaemonStatus, DomainRow, MigrateOptionsDict, JOBS_PATH};
use vmbeam_core::job::MigrateOptions;
use vmbeam_core::{Operation, Phase};
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::OwnedObjectPath;
use zbus::{interface, Connection, ObjectServer};

use crate::engine::{self, JobHandle, JobView};
use crate::error::DaemonError;
use crate::hooks;
use crate::ops::{self, OpError};
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

/// The one conversion of the daemon's operation errors to the wire.
impl From<OpError> for BeamError {
    fn from(e: OpError) -> Self {
        let text = e.to_string();
        match e {
            OpError::Invalid(_) | OpError::Transient(_) | OpError::Metadata { .. } => {
                BeamError::InvalidArgs(text)
            }
            OpError::NoSuchDomain(_) => BeamError::NoSuchDomain(text),
            OpError::CannotEnable(_) => BeamError::CannotEnable(text),
            OpError::Libvirt { .. } => BeamError::Libvirt(text),
            OpError::Pool(_) => BeamError::Failed(text),
            OpError::Engine(d) => d.into(),
        }
    }
}

/// The one conversion of migration and hook errors to the wire: the kind picks the D-Bus
/// error name, the text is the error's own (its causes stay in the daemon's log).
impl From<DaemonError> for BeamError {
    fn from(e: DaemonError) -> Self {
        let text = e.to_string();
        match e {
            DaemonError::NoSuchDomain(_) => BeamError::NoSuchDomain(text),
            DaemonError::InvalidArgs(_) | DaemonError::BadInput { .. } => {
                BeamError::InvalidArgs(text)
            }
            DaemonError::CannotEnable(_) => BeamError::CannotEnable(text),
            DaemonError::ZeroCopyRefused(_)
            | DaemonError::Backend(vmbeam_core::backend::BackendError::Refused(_)) => {
                BeamError::ZeroCopyRefused(text)
            }
            DaemonError::TicketRefused(_) | DaemonError::Ticket(_) => {
                BeamError::TicketRefused(text)
            }
            DaemonError::Busy(_) => BeamError::Busy(text),
            DaemonError::Libvirt { .. } => BeamError::Libvirt(text),
            DaemonError::Job(_) | DaemonError::MigrationFailed(_) => {
                BeamError::MigrationFailed(text)
            }
            DaemonError::Pool { .. }
            | DaemonError::Backend(vmbeam_core::backend::BackendError::Failed(_))
            | DaemonError::Failed(_) => BeamError::Failed(text),
        }
    }
}

/// The error and its causes on one line, for the log.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !out.ends_with(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        cur = c.source();
    }
    out
}

/// Validates an operation against the model, as every front end's request must pass.
fn checked(op: Operation) -> Result<Operation, BeamError> {
    op.validate().map_err(OpError::from)?;
    Ok(op)
}

/// Translates `Migrate`'s arguments into the operation model and validates it.
pub fn migrate_operation(
    domain: String,
    dest_uri: String,
    options: MigrateOptionsDict,
) -> Result<(String, String, MigrateOptions), BeamError> {
    let options = MigrateOptions::try_from(options)?;
    match checked(Operation::Migrate {
        domain,
        dest_uri,
        options,
    })? {
        Operation::Migrate {
            domain,
            dest_uri,
            options,
        } => Ok((domain, dest_uri, options)),
        _ => unreachable!("checked returns the operation it was given"),
    }
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
    /// Starts a migration and returns its job object. Options (a{sv}, every key optional,
    /// any other key refused): mode (s: auto, zero-copy, traditional), live, persistent,
    /// undefine-source, tls (b), migrate-uri (s), timeout (u), dest-xml and persist-xml (s:
    /// the domain XML and persistent definition for the destination, as virsh migrate's
    /// xml and persistent-xml options). (No double hyphen here: this text becomes an XML
    /// comment in the introspection data.)
    async fn migrate(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(object_server)] server: &ObjectServer,
        domain: String,
        dest_uri: String,
        options: MigrateOptionsDict,
    ) -> Result<OwnedObjectPath, BeamError> {
        authorize(&hdr, conn, ACTION_MIGRATE).await?;
        let (domain, dest_uri, opts) = migrate_operation(domain, dest_uri, options)?;
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
                engine::run(&ctx, &h3, &domain, &dest_uri, &opts)
            })
            .await
            .unwrap_or_else(|e| Err(DaemonError::Failed(format!("job thread: {e}"))));
            let (success, message, name) = match outcome {
                Ok(m) => (true, m, String::new()),
                Err(e) => {
                    warn!(job = id, error = %chain(&e), "migration failed");
                    let wire = BeamError::from(e);
                    (false, wire.text(), zbus::DBusError::name(&wire).to_string())
                }
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
        checked(Operation::Enable {
            domain: domain.clone(),
        })?;
        let ctx = self.ctx.clone();
        blocking(move || Ok(ops::set_enabled(&ctx, &domain, true)?)).await
    }

    /// Reverts `enable`.
    async fn disable(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        domain: String,
    ) -> Result<Vec<String>, BeamError> {
        authorize(&hdr, conn, ACTION_ENABLE).await?;
        checked(Operation::Disable {
            domain: domain.clone(),
        })?;
        let ctx = self.ctx.clone();
        blocking(move || Ok(ops::set_enabled(&ctx, &domain, false)?)).await
    }

    /// The beam-enabled domains of this host.
    async fn list_domains(&self) -> Result<Vec<DomainRow>, BeamError> {
        let ctx = self.ctx.clone();
        blocking(move || Ok(ops::list_domains(&ctx)?)).await
    }

    /// Whether zero-copy to `dest_uri` is possible (proven through the pool).
    async fn co_location(&self, dest_uri: String) -> Result<(bool, String, String), BeamError> {
        checked(Operation::CoLocation {
            dest_uri: dest_uri.clone(),
        })?;
        let ctx = self.ctx.clone();
        let c = blocking(move || Ok(ops::co_location(&ctx, &dest_uri)?)).await?;
        Ok((c.co_located, c.host, c.reason))
    }

    /// The daemon's view: identity, pool files, jobs.
    async fn status(&self) -> Result<DaemonStatus, BeamError> {
        let ctx = self.ctx.clone();
        let jobs: Vec<(String, JobView)> = self
            .jobs
            .lock()
            .expect("lock")
            .values()
            .map(|(p, h)| (p.clone(), h.view.lock().expect("lock").clone()))
            .collect();
        blocking(move || Ok(ops::status(&ctx, jobs)?)).await
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

    /// The beam pool directory, as this cloud VM sees it.
    #[zbus(property)]
    async fn pool_dir(&self) -> String {
        self.ctx.cfg.identity.pool_dir.display().to_string()
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
        let mode = self.handle.view.lock().expect("lock").mode;
        mode.map(|m| m.to_string()).unwrap_or_default()
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
        let handled = blocking(move || {
            hooks::handle(&ctx, &args, &xml).map_err(|e| {
                warn!(error = %chain(&e), "hook event refused");
                BeamError::from(e)
            })
        });
        match tokio::time::timeout(limit, handled).await {
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

    fn dict(live: bool, mode: &str) -> MigrateOptionsDict {
        MigrateOptionsDict {
            mode: Some(mode.into()),
            live: Some(live),
            timeout: Some(30),
            ..Default::default()
        }
    }

    #[test]
    fn options_translate_into_the_operation_model() {
        let (d, u, m) = migrate_operation(
            "web1".into(),
            "qemu+tcp://cvm2/system".into(),
            dict(true, "zero-copy"),
        )
        .unwrap();
        assert_eq!((d.as_str(), u.as_str()), ("web1", "qemu+tcp://cvm2/system"));
        assert_eq!(m.mode, vmbeam_core::plan::RequestedMode::RequireZeroCopy);
        assert!(m.live && !m.persistent);
        assert_eq!(m.timeout_secs, Some(30));
        assert_eq!(m.migrate_uri, None);
        let bad = [
            (
                "web1",
                "qemu+tcp://cvm2/system",
                dict(true, "fast"),
                "mode 'fast'",
            ),
            (
                "web1",
                "qemu+tcp://cvm2/system",
                dict(false, "auto"),
                "requires a live",
            ),
            (
                "",
                "qemu+tcp://cvm2/system",
                dict(true, "auto"),
                "domain must not be empty",
            ),
            ("web1", "cvm2", dict(true, "auto"), "is not a URI"),
            (
                "web1",
                "qemu+tcp://cvm2/system",
                MigrateOptionsDict {
                    persist_xml: Some("<domain/>".into()),
                    ..dict(true, "auto")
                },
                "requires a persistent migration",
            ),
            (
                "web1",
                "qemu+tcp://cvm2/system",
                MigrateOptionsDict {
                    dest_xml: Some(" \n".into()),
                    ..dict(true, "auto")
                },
                "destination XML must not be empty",
            ),
        ];
        for (d, u, o, want) in bad {
            match migrate_operation(d.into(), u.into(), o) {
                Err(BeamError::InvalidArgs(m)) => assert!(m.contains(want), "{m}"),
                other => panic!("{d} {u}: {other:?}"),
            }
        }
    }

    /// What the Nova shim (and any other client) sends as a plain `a{sv}`: the known keys
    /// arrive typed; an unknown key or a wrong type does not deserialize (zbus answers
    /// org.freedesktop.DBus.Error.InvalidArgs and the daemon does nothing).
    #[test]
    fn options_dictionary_on_the_wire() {
        use zbus::zvariant::{serialized::Context, to_bytes, Value, LE};
        let ctxt = Context::new_dbus(LE, 0);
        let encode = |pairs: Vec<(&str, Value<'static>)>| {
            let m: HashMap<String, Value<'static>> =
                pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            to_bytes(ctxt, &m).unwrap()
        };
        let nova = encode(vec![
            ("mode", Value::from("zero-copy")),
            ("live", Value::from(true)),
            ("persistent", Value::from(true)),
            ("undefine-source", Value::from(true)),
            ("tls", Value::from(false)),
            ("migrate-uri", Value::from("tcp://198.18.0.12")),
            ("dest-xml", Value::from("<domain type='kvm'/>")),
            (
                "persist-xml",
                Value::from("<domain type='kvm'><name>x</name></domain>"),
            ),
        ]);
        let (d, _): (MigrateOptionsDict, _) = nova.deserialize().unwrap();
        let o = MigrateOptions::try_from(d).unwrap();
        assert!(o.live && o.persistent && o.undefine_source && !o.tls);
        assert_eq!(o.migrate_uri.as_deref(), Some("tcp://198.18.0.12"));
        assert_eq!(o.dest_xml.as_deref(), Some("<domain type='kvm'/>"));
        assert!(o
            .persist_xml
            .as_deref()
            .is_some_and(|x| x.contains("<name>x</name>")));
        for bad in [
            vec![("bogus", Value::from(true))],
            vec![("live", Value::from("yes"))],
            vec![("timeout", Value::from("30"))],
            vec![("dest-xml", Value::from(true))],
        ] {
            let b = encode(bad);
            assert!(b.deserialize::<MigrateOptionsDict>().is_err());
        }
        // And the CLI's typed options survive the round trip.
        let cli = MigrateOptions {
            mode: vmbeam_core::plan::RequestedMode::ForceTraditional,
            live: true,
            timeout_secs: Some(5),
            migrate_uri: Some("tcp://198.18.0.13".into()),
            ..Default::default()
        };
        let b = to_bytes(ctxt, &MigrateOptionsDict::from(&cli)).unwrap();
        let (back, _): (MigrateOptionsDict, _) = b.deserialize().unwrap();
        assert_eq!(MigrateOptions::try_from(back).unwrap(), cli);
    }

    /// The checked-in introspection XML (`bus-api/org.vmbeam.VMBeam1.xml`, the contract the
    /// Nova shim reads) is what the server serves. `VMBEAM_BLESS=1` rewrites it.
    #[test]
    fn server_matches_the_checked_in_introspection() {
        use zbus::object_server::Interface;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, [7u8; 32]).unwrap();
        let conf = dir.path().join("vmbeam.conf");
        std::fs::write(
            &conf,
            format!(
                "host_id = \"cvm1\"\ncloud = \"c\"\npool_dir = \"{}\"\nkey_file = \"{}\"\n",
                dir.path().display(),
                key.display()
            ),
        )
        .unwrap();
        let identity = vmbeam_core::Identity::load(&conf).unwrap();
        let cfg = crate::config::DaemonConfig {
            identity,
            libvirt_uri: "test:///default".into(),
            memory_backing_dir: dir.path().into(),
            qmp_dir: dir.path().into(),
            state_dir: dir.path().into(),
            persistent_dir: dir.path().into(),
            rendezvous_timeout: Duration::from_millis(10),
            hook_timeout: Duration::from_secs(1),
        };
        let ctx = Arc::new(crate::state::Ctx {
            key: vmbeam_core::TicketKey::from_bytes(vec![7; 32]).unwrap(),
            replay: Mutex::new(
                vmbeam_core::ticket::FileReplayCache::open(dir.path().join("t")).unwrap(),
            ),
            cfg,
            tables: Mutex::new(Default::default()),
            libvirt_uuid: "u".into(),
            backend: Box::new(vmbeam_qemu::backend::QemuBackend::new(
                dir.path().to_path_buf(),
            )),
            pool: crate::guest_pool::GuestPool::Directory,
        });
        let mut xml = String::from(
            "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n \"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n<node>\n",
        );
        let manager = Manager {
            ctx: ctx.clone(),
            jobs: Arc::new(Mutex::new(BTreeMap::new())),
            next_job: AtomicU64::new(1),
        };
        manager.introspect_to_writer(&mut xml, 1);
        HookObj { ctx: ctx.clone() }.introspect_to_writer(&mut xml, 1);
        let job = JobObj {
            handle: Arc::new(JobHandle::new(1, "d", "u", Box::new(|| {}))),
            ctx,
        };
        job.introspect_to_writer(&mut xml, 1);
        xml.push_str("</node>\n");
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../bus-api/org.vmbeam.VMBeam1.xml"
        );
        if std::env::var_os("VMBEAM_BLESS").is_some() {
            std::fs::write(path, &xml).unwrap();
        }
        assert_eq!(
            vmbeam_bus::INTROSPECTION_XML, xml,
            "the D-Bus interface changed: review it, then VMBEAM_BLESS=1 cargo test -p vmbeamd server_matches"
        );
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
