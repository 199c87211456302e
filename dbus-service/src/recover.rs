//! Crash recovery, vmbeamd's part (the decisions are `vmbeam_core::recover`'s): at start and
//! then every [`RECOVERY_INTERVAL`], each owner record in the pool that is `handing-over`,
//! names this host as source or destination and has no job of this daemon behind it is
//! settled by what this host's libvirt reports and by the destination's `.ran` marker.
//!
//! - Source (the record's owner): the destination ran the guest → the hand-over is recorded
//!   (a copy libvirt keeps here is destroyed first); the guest runs here, no job, no marker →
//!   `x-ignore-shared` off, the file taken back; libvirt's job still in flight → wait;
//!   anything else is held, and `vmbeam status` shows why and what to do.
//! - Destination (the recipient): the guest runs here and the marker is missing (the watcher
//!   that leaves it died with its daemon) → `x-ignore-shared` off, the marker left, so the
//!   source can settle.
//!
//! A record is recovered only while no job of this daemon migrates its domain: the domain is
//! entered in `Tables::recovering` for the pass, and `OutgoingEntry::register` refuses a job
//! for a domain being recovered (and the recovery skips a domain with a job).

use std::time::Duration;

use tracing::{error, info, info_span, warn};
use virt::domain::Domain;
use vmbeam_core::pool::{BeamPool, OwnerRecord, OwnerState, RecordStatus};
use vmbeam_core::recover::{
    destination_action, source_action, DestinationAction, Local, SourceAction,
};
use vmbeam_core::{DomainFacts, DomainUuid};

use crate::error::DaemonError;
use crate::libvirt_conn::Conn;
use crate::state::{Ctx, SharedCtx, UndefineAfterHandOver};

/// How often the pool's hand-overs are looked at.
pub const RECOVERY_INTERVAL: Duration = Duration::from_secs(2);

/// A domain as this host's libvirt reports it.
#[derive(Debug, Clone)]
pub struct Observed {
    pub local: Local,
    /// The live XML's facts while the domain is active.
    pub facts: Option<DomainFacts>,
}

/// This host's libvirt, as recovery needs it.
pub trait LocalDomains {
    /// What libvirt says of the domain with `uuid`.
    fn observe(&self, uuid: &DomainUuid) -> Result<Observed, DaemonError>;
    /// Destroys the domain's running instance (`virsh destroy`).
    fn destroy(&self, uuid: &DomainUuid) -> Result<(), DaemonError>;
    /// Removes the domain's persistent definition if it is not running (what
    /// `--undefinesource` would have done had libvirt's Confirm finished).
    fn undefine(&self, uuid: &DomainUuid) -> Result<(), DaemonError>;
}

/// [`LocalDomains`] through libvirt (a connection opened on first use, and again after an
/// error: libvirtd may have been restarted).
pub struct LibvirtView {
    uri: String,
    conn: std::cell::RefCell<Option<Conn>>,
}

impl LibvirtView {
    /// The libvirt at `uri`.
    pub fn new(uri: &str) -> Self {
        LibvirtView {
            uri: uri.to_owned(),
            conn: std::cell::RefCell::new(None),
        }
    }

    fn lookup(&self, uuid: &DomainUuid) -> Result<Option<Domain>, DaemonError> {
        let mut conn = self.conn.borrow_mut();
        if conn.is_none() {
            *conn = Some(Conn::open(&self.uri).map_err(DaemonError::libvirt)?);
        }
        let c = conn.as_ref().expect("opened above");
        match Domain::lookup_by_uuid_string(c, uuid.as_str()) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.code() == virt::error::ErrorNumber::NoDomain => Ok(None),
            Err(e) => {
                *conn = None;
                Err(DaemonError::libvirt(e))
            }
        }
    }
}

/// Reads libvirt's view of one domain.
fn observe_domain(d: &Domain) -> Result<Observed, DaemonError> {
    if !d.is_active().map_err(DaemonError::libvirt)? {
        return Ok(Observed {
            local: Local::Absent,
            facts: None,
        });
    }
    // The destination of an incoming migration: libvirt refuses job statistics there
    // ("migration statistics are available only on the source host"), which says just
    // that a migration job is in progress here.
    let migrating = match d.get_job_info() {
        Ok(job) => job.r#type != virt::sys::VIR_DOMAIN_JOB_NONE as i32,
        Err(e) if e.code() == virt::error::ErrorNumber::OperationUnsupported => true,
        Err(e) => return Err(DaemonError::libvirt(e)),
    };
    let (state, _reason) = d.get_state().map_err(DaemonError::libvirt)?;
    let xml = d.get_xml_desc(0).map_err(DaemonError::libvirt)?;
    let facts = DomainFacts::from_xml(&xml).map_err(|e| DaemonError::bad_input("", e))?;
    let local = if migrating {
        Local::Migrating
    } else if state == virt::sys::VIR_DOMAIN_RUNNING {
        Local::Running
    } else if state == virt::sys::VIR_DOMAIN_PAUSED {
        Local::Paused
    } else {
        // Shutting down, crashed, pm-suspended: not running guest code here.
        Local::Absent
    };
    Ok(Observed {
        local,
        facts: Some(facts),
    })
}

impl LocalDomains for LibvirtView {
    fn observe(&self, uuid: &DomainUuid) -> Result<Observed, DaemonError> {
        match self.lookup(uuid)? {
            None => Ok(Observed {
                local: Local::Absent,
                facts: None,
            }),
            Some(d) => observe_domain(&d),
        }
    }

    fn destroy(&self, uuid: &DomainUuid) -> Result<(), DaemonError> {
        match self.lookup(uuid)? {
            None => Ok(()),
            Some(d) => match d.destroy() {
                Ok(()) => Ok(()),
                // Already gone between the look and the destroy.
                Err(_) if !d.is_active().unwrap_or(true) => Ok(()),
                Err(e) => Err(DaemonError::libvirt(e)),
            },
        }
    }

    fn undefine(&self, uuid: &DomainUuid) -> Result<(), DaemonError> {
        match self.lookup(uuid)? {
            Some(d) if !d.is_active().map_err(DaemonError::libvirt)? => {
                d.undefine().map_err(DaemonError::libvirt)
            }
            _ => Ok(()),
        }
    }
}

/// The domain entered in `Tables::recovering` for one record's recovery; removed on drop.
struct RecoveryClaim<'a> {
    ctx: &'a Ctx,
    uuid: DomainUuid,
}

impl<'a> RecoveryClaim<'a> {
    /// `None` while a job of this daemon migrates the domain (from its planning on: see
    /// `Tables::migrating`) or another pass holds it.
    fn take(ctx: &'a Ctx, uuid: &DomainUuid) -> Option<Self> {
        let mut t = ctx.tables.lock().expect("lock");
        if t.outgoing.contains_key(uuid)
            || t.migrating.contains_key(uuid)
            || !t.recovering.insert(uuid.clone())
        {
            return None;
        }
        Some(RecoveryClaim {
            ctx,
            uuid: uuid.clone(),
        })
    }
}

impl Drop for RecoveryClaim<'_> {
    fn drop(&mut self) {
        let mut t = self.ctx.tables.lock().unwrap_or_else(|p| p.into_inner());
        t.recovering.remove(&self.uuid);
    }
}

/// One pass over the pool. Returns what was settled (one line per pool file); what is held
/// is in `Tables::in_doubt` (shown by `Status`).
pub fn reconcile(ctx: &Ctx, domains: &dyn LocalDomains) -> Vec<String> {
    let me = &ctx.cfg.identity.host_id;
    let pool = BeamPool::new(&ctx.cfg.identity.pool_dir);
    let entries = match pool.list() {
        Ok(e) => e,
        Err(e) => {
            warn!(error = %e, "recovery: cannot list the pool");
            return Vec::new();
        }
    };
    let mut settled = Vec::new();
    let mut doubts = Vec::new();
    for entry in entries {
        let RecordStatus::Valid(r) = entry.record else {
            continue;
        };
        if r.state != OwnerState::HandingOver {
            continue;
        }
        let to = r
            .handing_over_to
            .clone()
            .expect("handing-over names a recipient");
        let done = if &r.owner == me {
            recover_source(ctx, domains, &pool, &r.pool_file, &mut doubts)
        } else if &to == me {
            recover_destination(ctx, domains, &pool, &r)
        } else {
            None
        };
        settled.extend(done);
    }
    settled.extend(reconcile_devices_with(
        ctx,
        domains,
        DEVICE_MIN_AGE,
        &mut doubts,
    ));
    // What is no longer in doubt leaves the table.
    let mut t = ctx.tables.lock().expect("lock");
    t.in_doubt
        .retain(|file, _| doubts.iter().any(|(f, _)| f == file));
    for (file, advice) in doubts {
        if t.in_doubt.get(&file) != Some(&advice) {
            warn!(pool_file = %file, "{advice}");
            t.in_doubt.insert(file, advice);
        }
    }
    settled
}

/// The source's side of one interrupted hand-over of `file`.
fn recover_source(
    ctx: &Ctx,
    domains: &dyn LocalDomains,
    pool: &BeamPool,
    file: &str,
    doubts: &mut Vec<(String, String)>,
) -> Option<String> {
    let me = &ctx.cfg.identity.host_id;
    // Re-read under the claim: a job may have settled the record meanwhile.
    let uuid = pool.read_owner(file).ok()??.domain_uuid;
    let _claim = RecoveryClaim::take(ctx, &uuid)?;
    let r = match pool.read_owner(file) {
        Ok(Some(r)) if r.state == OwnerState::HandingOver && &r.owner == me => r,
        _ => return None,
    };
    let to = r
        .handing_over_to
        .clone()
        .expect("handing-over names a recipient");
    let span = info_span!("recovery", pool_file = %file, domain = %r.domain_uuid, dest = %to);
    let _g = span.enter();
    let observed = match domains.observe(&r.domain_uuid) {
        Ok(o) => o,
        Err(e) => {
            warn!(error = %e, "cannot ask libvirt about the domain; retrying");
            return None;
        }
    };
    let ran = match pool.has_ran(file) {
        Ok(ran) => ran,
        Err(e) => {
            warn!(error = %e, "cannot tell whether the destination ran the guest; retrying");
            return None;
        }
    };
    let complete = |how: &str| -> Option<String> {
        let generation = r.generation.saturating_add(1);
        match pool.complete_hand_over(file, me, &to, generation) {
            Ok(_) => {
                if let Err(e) = pool.clear_ran(file) {
                    warn!(error = %e, "could not delete the destination's ran marker");
                }
                // The job asked for --undefinesource, which libvirt's Confirm did not get to.
                if UndefineAfterHandOver(&ctx.cfg).take(&r.domain_uuid) {
                    match domains.undefine(&r.domain_uuid) {
                        Ok(()) => info!("the source's definition removed (--undefinesource)"),
                        Err(e) => warn!(error = %e, "could not remove the source's definition"),
                    }
                }
                let what = format!("{file}: handed over to {to} ({how})");
                info!("recovered: {what}");
                Some(what)
            }
            Err(e) => {
                error!(error = %e, "could not record the hand-over");
                None
            }
        }
    };
    match source_action(observed.local, ran) {
        SourceAction::Wait => None,
        SourceAction::Complete => complete("the guest runs there and not here"),
        SourceAction::FenceThenComplete => {
            error!(local = %observed.local, "the destination ran the guest but libvirt keeps a copy here: destroying it (fenced)");
            match domains.destroy(&r.domain_uuid) {
                Ok(()) => complete("it ran there; the copy here was destroyed"),
                Err(e) => {
                    error!(error = %e, "could not destroy the copy here; retrying");
                    None
                }
            }
        }
        SourceAction::TakeBack => {
            let facts = observed.facts?;
            match ctx.backend.reset_zero_copy(&facts) {
                Ok(o) => info!(outcome = %o, "x-ignore-shared reset on the source"),
                Err(e) => {
                    warn!(error = %e, "cannot reset x-ignore-shared yet; the file stays handing-over");
                    return None;
                }
            }
            match pool.abort_hand_over(file, me) {
                Ok(_) => {
                    let what =
                        format!("{file}: taken back (the guest runs here; {to} never ran it)");
                    info!("recovered: {what}");
                    Some(what)
                }
                Err(e) => {
                    error!(error = %e, "could not take the file back");
                    None
                }
            }
        }
        SourceAction::Hold(doubt) => {
            doubts.push((file.to_owned(), doubt.advice(to.as_str())));
            None
        }
    }
}

/// The destination's side: the guest runs here, but the marker the source waits for is
/// missing (its watcher died with the daemon that armed it).
fn recover_destination(
    ctx: &Ctx,
    domains: &dyn LocalDomains,
    pool: &BeamPool,
    r: &OwnerRecord,
) -> Option<String> {
    let file = &r.pool_file;
    if pool.has_ran(file).unwrap_or(true) {
        return None;
    }
    let observed = domains.observe(&r.domain_uuid).ok()?;
    match destination_action(observed.local) {
        DestinationAction::Nothing => None,
        DestinationAction::MarkRan => {
            let span = info_span!("recovery", pool_file = %file, domain = %r.domain_uuid, source = %r.owner);
            let _g = span.enter();
            if let Some(facts) = &observed.facts {
                if let Err(e) = ctx.backend.reset_zero_copy(facts) {
                    warn!(error = %e, "cannot reset x-ignore-shared on the destination");
                }
            }
            match pool.mark_ran(file) {
                Ok(()) => {
                    let what = format!("{file}: the guest runs here; marked for {}", r.owner);
                    info!("recovered: {what}");
                    Some(what)
                }
                Err(e) => {
                    error!(error = %e, "could not leave the ran marker");
                    None
                }
            }
        }
    }
}

/// How old a device-pool record must be before recovery gives its memory back (a younger
/// one may belong to a start whose QEMU libvirt has not shown running yet).
pub const DEVICE_MIN_AGE: Duration = Duration::from_secs(60);

/// The host-device pool's part of a pass: memory this cloud VM holds (its records, kept
/// across restarts) for a guest that no longer runs here and that no job or start of this
/// daemon is on (a daemon that died before `release end` gave it back) goes back to the
/// host: FREE as its owner, WITHDRAW as a share's destination, each only once nothing here
/// maps the device. Records younger than `min_age` are left alone. Returns what was given
/// back.
pub fn reconcile_devices(ctx: &Ctx, domains: &dyn LocalDomains, min_age: Duration) -> Vec<String> {
    let mut doubts = Vec::new();
    let settled = reconcile_devices_with(ctx, domains, min_age, &mut doubts);
    let mut t = ctx.tables.lock().expect("lock");
    for (guest, advice) in doubts {
        t.in_doubt.insert(guest, advice);
    }
    settled
}

/// [`reconcile_devices`], what is held in doubt (by guest UUID) added to `doubts`.
fn reconcile_devices_with(
    ctx: &Ctx,
    domains: &dyn LocalDomains,
    min_age: Duration,
    doubts: &mut Vec<(String, String)>,
) -> Vec<String> {
    use crate::devpool::{error_chain, DevicePool, Role};
    let Some(device) = ctx.pool.device() else {
        return Vec::new();
    };
    let holdings = match device.holdings() {
        Ok(h) => h,
        Err(e) => {
            warn!(error = %error_chain(&e), "recovery: cannot read the device pool's records");
            return Vec::new();
        }
    };
    let mut settled = Vec::new();
    for h in holdings {
        // An interrupted hand-over (a share the source's record still names, or a share
        // whose guest runs here unmarked) is settled at once, by what is observed.
        let open = match h.role {
            Role::Owner => h.shared_with.is_some(),
            Role::Destination => h.proof.is_some(),
        };
        if open {
            let Some(_claim) = RecoveryClaim::take(ctx, &h.guest) else {
                continue;
            };
            match device_hand_over(ctx, device, &h, domains, doubts) {
                HandOver::Settled(done) => {
                    settled.push(done);
                    continue;
                }
                HandOver::Held => continue,
                HandOver::NotOpen => {}
            }
        }
        let young = !matches!(device.age(&h.guest), Some(age) if age >= min_age);
        if young
            || ctx
                .tables
                .lock()
                .expect("lock")
                .running
                .contains_key(&h.guest)
        {
            continue;
        }
        let Some(_claim) = RecoveryClaim::take(ctx, &h.guest) else {
            continue;
        };
        match domains.observe(&h.guest) {
            Ok(o) if o.local == Local::Absent => {}
            Ok(_) => continue,
            Err(e) => {
                warn!(guest = %h.guest, error = %e, "recovery: cannot ask libvirt about a guest whose memory this cloud VM holds");
                continue;
            }
        }
        let step = match h.role {
            Role::Owner => DevicePool::free_held,
            Role::Destination => DevicePool::withdraw,
        };
        match step(device, &h.guest) {
            Ok(()) => {
                info!(guest = %h.guest, role = %h.role, "recovery: memory of a guest gone from here given back to the host");
                settled.push(format!(
                    "{}: memory given back to the host ({})",
                    h.guest, h.role
                ));
            }
            Err(e) => {
                warn!(guest = %h.guest, error = %error_chain(&e), "recovery: cannot give back the memory of a guest gone from here")
            }
        }
    }
    settled
}

/// What [`device_hand_over`] did.
enum HandOver {
    /// Settled, in words.
    Settled(String),
    /// Waits (in doubt, or a job in flight).
    Held,
    /// Nothing of a hand-over to settle: the ordinary pass goes on.
    NotOpen,
}

/// One interrupted hand-over of device memory (`vmbeamd` died, or its job left it to
/// recovery), settled by what libvirt shows here and the ran record in the control page:
///
/// - Source (the owner, its record names the share): libvirt's job still in flight → wait;
///   the destination ran the guest → a copy libvirt keeps here is destroyed (never resumed)
///   and the device RELEASEd once nothing maps it; the destination never ACCEPTed the
///   share (a job that failed before its `migrate begin`, a daemon that died between
///   SHARE and libvirt's job) → UNSHARE, whatever the guest's state here (`x-ignore-shared`
///   off if it runs); the guest runs here and never ran there → `x-ignore-shared` off and
///   the hand-over closed (the destination WITHDRAWs at its `release end`); otherwise
///   held, with what it waits for in `vmbeam status`.
/// - Destination: the guest runs here and no ran record was left (the watcher died with
///   its daemon) → `x-ignore-shared` off, the record left and the memory adopted, so the
///   source can settle. A destination whose guest is gone is the ordinary pass's (WITHDRAW).
fn device_hand_over(
    ctx: &Ctx,
    device: &crate::devpool::DevicePool,
    h: &crate::devpool::Holding,
    domains: &dyn LocalDomains,
    doubts: &mut Vec<(String, String)>,
) -> HandOver {
    use crate::devpool::{error_chain, DevicePoolError, Role};
    let guest = &h.guest;
    let span = info_span!("recover_device", %guest, role = %h.role);
    let _g = span.enter();
    let observed = match domains.observe(guest) {
        Ok(o) => o,
        Err(e) => {
            warn!(error = %e, "recovery: cannot ask libvirt about a guest whose memory is being handed over");
            return HandOver::Held;
        }
    };
    let reset = |facts: &Option<DomainFacts>| {
        if let Some(f) = facts {
            match ctx.backend.reset_zero_copy(f) {
                Ok(o) => info!(outcome = %o, "recovery: x-ignore-shared off"),
                Err(e) => warn!(error = %e, "recovery: cannot turn x-ignore-shared off"),
            }
        }
    };
    if h.role == Role::Destination {
        if observed.local != Local::Running {
            return HandOver::NotOpen;
        }
        reset(&observed.facts);
        return match device.mark_ran(guest) {
            Ok(()) => HandOver::Settled(format!(
                "{guest}: the guest runs here: ran record left in the control page, its memory adopted"
            )),
            Err(e) => {
                warn!(error = %error_chain(&e), "recovery: cannot leave the ran record");
                HandOver::Held
            }
        };
    }
    let to = h.shared_with.clone().unwrap_or_default();
    let mut held = |advice: String| {
        doubts.push((guest.as_str().to_owned(), advice));
        HandOver::Held
    };
    if observed.local == Local::Migrating {
        return HandOver::Held;
    }
    let ran = match device.has_ran(guest) {
        Ok(r) => r,
        Err(e) => {
            return held(format!(
            "hand-over of the guest's memory to {to} open: the control page cannot be read ({})",
            error_chain(&e)
        ))
        }
    };
    if ran {
        if observed.local != Local::Absent {
            warn!("recovery: the guest ran on the destination; destroying the copy libvirt keeps here");
            if let Err(e) = domains.destroy(guest) {
                return held(format!(
                    "the guest ran on {to}, but destroying its copy here failed ({e}); vmbeamd keeps trying"
                ));
            }
        }
        return match device.release(guest) {
            Ok(()) => {
                if UndefineAfterHandOver(&ctx.cfg).take(guest) {
                    if let Err(e) = domains.undefine(guest) {
                        warn!(error = %e, "recovery: could not remove the source's definition");
                    }
                }
                HandOver::Settled(format!(
                    "{guest}: the guest ran on {to}: its memory released here"
                ))
            }
            Err(DevicePoolError::StillMapped { pids, .. }) => held(format!(
                "the guest ran on {to}; its memory is released here once processes {pids:?} let go of it"
            )),
            Err(e) => held(format!(
                "the guest ran on {to}; releasing its memory here failed ({}); vmbeamd keeps trying",
                error_chain(&e)
            )),
        };
    }
    // Not ran there, no job in flight: a share the destination never ACCEPTed (its
    // `migrate begin` never ran) is taken back here, whatever the guest's state: nothing
    // in the destination maps it, and the host refuses once the destination accepted.
    match device.unshare(guest) {
        Ok(()) => {
            reset(&observed.facts);
            return HandOver::Settled(format!(
                "{guest}: {to} never accepted the share of the guest's memory: taken back (the guest is {} here)",
                observed.local
            ));
        }
        Err(DevicePoolError::ShareAccepted { .. }) => {}
        Err(e) => {
            return held(format!(
                "hand-over of the guest's memory to {to} open: the guest has not run there, but the share could not be taken back ({}); vmbeamd keeps trying",
                error_chain(&e)
            ))
        }
    }
    if observed.local == Local::Running {
        reset(&observed.facts);
        return match device.close_hand_over(guest) {
            Ok(()) => HandOver::Settled(format!(
                "{guest}: the guest runs here and never ran on {to}: hand-over closed"
            )),
            Err(e) => held(format!(
                "the guest runs here; the hand-over to {to} cannot be closed ({})",
                error_chain(&e)
            )),
        };
    }
    held(format!(
        "hand-over of the guest's memory to {to} open: the guest is {} and has not run on {to}; held until one of them runs it (`virsh resume` here, or finish the migration)",
        observed.local
    ))
}

/// Recovery for the daemon's lifetime: a pass at once, then one every [`RECOVERY_INTERVAL`]
/// (on a blocking thread: libvirt and QMP calls block).
pub fn serve_forever(ctx: SharedCtx) {
    let domains = LibvirtView::new(&ctx.cfg.libvirt_uri);
    loop {
        reconcile(&ctx, &domains);
        std::thread::sleep(RECOVERY_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    //! Recovery after a daemon died mid hand-over, without libvirt: a fake libvirt view, the
    //! fake backend, a temporary pool shared by cvm1 (source), cvm2 (destination), cvm3.

    use vmbeam_core::pool::OwnerRecord;
    use vmbeam_core::HostId;

    use super::*;
    use crate::engine::OutgoingEntry;
    use crate::state::Outgoing;
    use crate::testing::{host_id, uuid, Cloud, FakeLibvirt, Host};

    /// cvm1's file of the test domain, `handing-over` to `to` (generation 3): what a source
    /// vmbeamd killed mid-migration leaves.
    fn interrupted(cloud: &Cloud, to: &str) -> String {
        let file = cloud.source_file();
        BeamPool::new(cloud.pool_dir())
            .begin_hand_over(&file, &host_id("cvm1"), &host_id(to))
            .unwrap();
        file
    }

    fn record(cloud: &Cloud, file: &str) -> OwnerRecord {
        BeamPool::new(cloud.pool_dir())
            .read_owner(file)
            .unwrap()
            .unwrap()
    }

    fn summary(r: &OwnerRecord) -> (OwnerState, HostId, Option<HostId>, u64) {
        (
            r.state,
            r.owner.clone(),
            r.handing_over_to.clone(),
            r.generation,
        )
    }

    fn doubt(h: &Host, file: &str) -> Option<String> {
        h.ctx.tables.lock().unwrap().in_doubt.get(file).cloned()
    }

    /// A vmbeamd that died before `release end` left the host holding a guest's memory;
    /// restarted, its recovery gives it back once libvirt shows the guest gone, and keeps
    /// what a running guest or a start in progress uses.
    #[test]
    fn device_memory_of_a_guest_gone_from_here_goes_back_to_the_host() {
        use crate::host_fixture::{HostFixture, A1};
        let host = HostFixture::new();
        let cloud = Cloud::new();
        let before = cloud.device_host("cvm1", &host, A1);
        crate::hooks::handle(
            &before.ctx,
            &["web1", "start", "begin", "-"].map(String::from),
            &crate::testing::domain_xml("cvm1"),
        )
        .unwrap();
        drop(before);
        let after = cloud.device_host("cvm1", &host, A1);
        let device = after.ctx.pool.device().unwrap();
        assert_eq!(
            device.holdings().unwrap().len(),
            1,
            "remembered across the restart"
        );

        // Running here: kept. Gone, but the record is young (a start in progress): kept.
        let running = FakeLibvirt::new(Local::Running);
        assert!(reconcile_devices(&after.ctx, &running, Duration::ZERO).is_empty());
        let gone = FakeLibvirt::new(Local::Absent);
        assert!(reconcile_devices(&after.ctx, &gone, Duration::from_secs(3600)).is_empty());
        assert_eq!(host.attached().len(), 1);

        let settled = reconcile_devices(&after.ctx, &gone, Duration::ZERO);
        assert_eq!(settled.len(), 1, "{settled:?}");
        assert!(host.attached().is_empty());
        assert!(host.files().is_empty(), "nothing left on the host");
        assert!(device.holdings().unwrap().is_empty());
        assert!(reconcile_devices(&after.ctx, &gone, Duration::ZERO).is_empty());
    }

    /// An interrupted hand-over in the host-device pool: the guest started on a1, its memory
    /// shared with a2 and proven there; then the source's job was gone.
    fn device_hand_over(host: &crate::host_fixture::HostFixture, cloud: &Cloud) -> (Host, Host) {
        use crate::host_fixture::{cvm, A1, A2};
        let src = cloud.device_host("cvm1", host, A1);
        let dst = cloud.device_host("cvm2", host, A2);
        crate::hooks::handle(
            &src.ctx,
            &["web1", "start", "begin", "-"].map(String::from),
            &crate::testing::domain_xml("cvm1"),
        )
        .unwrap();
        let s = src.ctx.pool.device().unwrap();
        let there = s.share(&uuid(), &cvm(A2)).unwrap();
        let token = s.prove(&uuid()).unwrap();
        dst.ctx
            .pool
            .device()
            .unwrap()
            .accept_share(&uuid(), &there, &token)
            .unwrap();
        (src, dst)
    }

    #[test]
    fn an_interrupted_device_hand_over_is_settled_by_the_control_pages_ran_record() {
        use crate::devpool::Role;
        use crate::host_fixture::{HostFixture, A2};
        let host = HostFixture::new();
        let cloud = Cloud::new();
        let (src, dst) = device_hand_over(&host, &cloud);
        let (s, d) = (
            src.ctx.pool.device().unwrap(),
            dst.ctx.pool.device().unwrap(),
        );
        // The destination runs the guest but its watcher died: recovery leaves the record
        // and adopts the memory.
        let done = reconcile_devices(&dst.ctx, &FakeLibvirt::new(Local::Running), DEVICE_MIN_AGE);
        assert_eq!(done.len(), 1, "{done:?}");
        assert!(done[0].contains("ran record"), "{done:?}");
        assert_eq!(dst.fake.calls(), ["reset_zero_copy web1"]);
        assert_eq!(d.holding(&uuid()).unwrap().unwrap().role, Role::Owner);
        assert!(s.has_ran(&uuid()).unwrap());

        // The source: nothing moves while libvirt's job is in flight.
        assert!(reconcile(&src.ctx, &FakeLibvirt::new(Local::Migrating)).is_empty());
        assert_eq!(host.attached().len(), 2);
        // A copy libvirt keeps here is destroyed, never resumed; then the device goes.
        let libvirt = FakeLibvirt::new(Local::Running);
        let done = reconcile(&src.ctx, &libvirt);
        assert_eq!(done.len(), 1, "{done:?}");
        assert!(libvirt.fenced());
        let attached = host.attached();
        assert_eq!(attached.len(), 1);
        assert_eq!(attached[0].0, A2);
        assert!(s.holdings().unwrap().is_empty());
        assert!(reconcile(&src.ctx, &FakeLibvirt::new(Local::Absent)).is_empty());
    }

    /// A vmbeamd that died between SHARE and the destination's `migrate begin` (or whose
    /// job failed there and could not take the share back): recovery UNSHAREs the share the
    /// destination never accepted, and the guest's memory is the source's alone again.
    #[test]
    fn a_leftover_share_the_destination_never_accepted_is_taken_back() {
        use crate::host_fixture::{cvm, HostFixture, A1, A2};
        let host = HostFixture::new();
        let cloud = Cloud::new();
        let src = cloud.device_host("cvm1", &host, A1);
        let dst = cloud.device_host("cvm2", &host, A2);
        crate::hooks::handle(
            &src.ctx,
            &["web1", "start", "begin", "-"].map(String::from),
            &crate::testing::domain_xml("cvm1"),
        )
        .unwrap();
        let s = src.ctx.pool.device().unwrap();
        s.share(&uuid(), &cvm(A2)).unwrap();
        s.prove(&uuid()).unwrap();
        assert_eq!(host.attached().len(), 2);
        // vmbeamd dies before libvirt's job; a new one starts.
        drop(src);
        let src = cloud.device_host("cvm1", &host, A1);
        let s = src.ctx.pool.device().unwrap();
        // The destination holds nothing to recover.
        assert!(
            reconcile_devices(&dst.ctx, &FakeLibvirt::new(Local::Absent), Duration::ZERO)
                .is_empty()
        );
        // No move while libvirt's job may still be in flight.
        assert!(reconcile(&src.ctx, &FakeLibvirt::new(Local::Migrating)).is_empty());
        assert_eq!(host.attached().len(), 2);
        // The guest runs here: the share is taken back, x-ignore-shared off.
        let done = reconcile(&src.ctx, &FakeLibvirt::new(Local::Running));
        assert_eq!(done.len(), 1, "{done:?}");
        assert!(done[0].contains("never accepted"), "{done:?}");
        assert!(src
            .fake
            .calls()
            .contains(&"reset_zero_copy web1".to_string()));
        let attached = host.attached();
        assert_eq!((attached.len(), attached[0].0.as_str()), (1, A1));
        let rec = s.holding(&uuid()).unwrap().unwrap();
        assert_eq!(
            (rec.role, rec.shared_with),
            (crate::devpool::Role::Owner, None)
        );
        assert_eq!(doubt(&src, uuid().as_str()), None);
        // Nothing left to settle; a guest gone for good then gives its memory back.
        assert!(reconcile(&src.ctx, &FakeLibvirt::new(Local::Running)).is_empty());
        let done = reconcile_devices(&src.ctx, &FakeLibvirt::new(Local::Absent), Duration::ZERO);
        assert_eq!(done.len(), 1, "{done:?}");
        assert!(host.attached().is_empty() && host.files().is_empty());
    }

    #[test]
    fn a_device_hand_over_whose_guest_never_left_is_held_in_doubt_then_closed() {
        use crate::host_fixture::{HostFixture, A1, A2};
        let host = HostFixture::new();
        let cloud = Cloud::new();
        let (src, dst) = device_hand_over(&host, &cloud);
        let s = src.ctx.pool.device().unwrap();
        // Seen nowhere, never ran at the destination: held, and `vmbeam status` says so.
        assert!(reconcile(&src.ctx, &FakeLibvirt::new(Local::Absent)).is_empty());
        let advice = doubt(&src, uuid().as_str()).expect("in doubt");
        assert!(advice.contains("has not run on"), "{advice}");
        let st = crate::ops::status(&src.ctx, Vec::new()).unwrap();
        // The pool is the host's devices, not the (unused) directory.
        let channel = host.channel(A1);
        assert_eq!(
            st.pool,
            format!("host-device (vmbeam-host channel {})", channel.display())
        );
        let row = st
            .pool_files
            .iter()
            .find(|(_, _, rec)| rec.starts_with("host-device"))
            .expect("a device row");
        assert!(row.0.ends_with("resource2"), "{row:?}");
        assert!(
            row.2.contains("role=owner")
                && row.2.contains(&format!("shared-with={A2}"))
                && row.2.contains("proof=")
                && row.2.contains(&advice),
            "{row:?}"
        );
        assert_eq!(host.attached().len(), 2);

        // Running here again: x-ignore-shared off, the hand-over closed, the doubt gone.
        let done = reconcile(&src.ctx, &FakeLibvirt::new(Local::Running));
        assert_eq!(done.len(), 1, "{done:?}");
        assert!(src
            .fake
            .calls()
            .contains(&"reset_zero_copy web1".to_string()));
        assert_eq!(s.holding(&uuid()).unwrap().unwrap().shared_with, None);
        assert_eq!(doubt(&src, uuid().as_str()), None);
        // The destination, whose guest is gone, withdraws its share.
        let done = reconcile_devices(&dst.ctx, &FakeLibvirt::new(Local::Absent), Duration::ZERO);
        assert_eq!(done.len(), 1, "{done:?}");
        let attached = host.attached();
        assert_eq!(attached.len(), 1);
        assert_eq!(attached[0].0, A1);
    }

    #[test]
    fn the_guest_ran_on_the_destination_the_hand_over_is_recorded() {
        let cloud = Cloud::new();
        let file = interrupted(&cloud, "cvm2");
        let src = cloud.host("cvm1");
        let pool = BeamPool::new(cloud.pool_dir());
        pool.mark_ran(&file).unwrap();
        let done = reconcile(&src.ctx, &FakeLibvirt::new(Local::Absent));
        assert_eq!(done.len(), 1, "{done:?}");
        assert_eq!(
            summary(&record(&cloud, &file)),
            (OwnerState::Active, host_id("cvm2"), None, 4)
        );
        assert!(!pool.has_ran(&file).unwrap(), "the marker has served");
        assert!(src.fake.calls().is_empty(), "{:?}", src.fake.calls());
        // Settled: a second pass changes nothing.
        assert!(reconcile(&src.ctx, &FakeLibvirt::new(Local::Absent)).is_empty());
    }

    #[test]
    fn a_copy_libvirt_keeps_here_after_the_destination_ran_the_guest_is_destroyed_first() {
        for local in [Local::Running, Local::Paused] {
            let cloud = Cloud::new();
            let file = interrupted(&cloud, "cvm2");
            let src = cloud.host("cvm1");
            BeamPool::new(cloud.pool_dir()).mark_ran(&file).unwrap();
            let libvirt = FakeLibvirt::new(local);
            reconcile(&src.ctx, &libvirt);
            assert_eq!(*libvirt.destroyed.borrow(), vec![uuid()], "{local:?}");
            assert_eq!(
                summary(&record(&cloud, &file)),
                (OwnerState::Active, host_id("cvm2"), None, 4),
                "{local:?}"
            );
        }
    }

    #[test]
    fn the_guest_running_here_unmarked_is_taken_back_with_x_ignore_shared_off() {
        let cloud = Cloud::new();
        let file = interrupted(&cloud, "cvm2");
        let src = cloud.host("cvm1");
        let libvirt = FakeLibvirt::new(Local::Running);
        reconcile(&src.ctx, &libvirt);
        assert_eq!(src.fake.calls(), ["reset_zero_copy web1"]);
        assert!(libvirt.destroyed.borrow().is_empty());
        assert_eq!(
            summary(&record(&cloud, &file)),
            (OwnerState::Active, host_id("cvm1"), None, 3)
        );
        // A new migration can begin the hand-over again.
        BeamPool::new(cloud.pool_dir())
            .begin_hand_over(&file, &host_id("cvm1"), &host_id("cvm2"))
            .unwrap();
    }

    #[test]
    fn nothing_moves_while_libvirt_still_runs_the_job() {
        let cloud = Cloud::new();
        let file = interrupted(&cloud, "cvm2");
        let src = cloud.host("cvm1");
        let before = record(&cloud, &file);
        for ran in [false, true] {
            if ran {
                BeamPool::new(cloud.pool_dir()).mark_ran(&file).unwrap();
            }
            assert!(reconcile(&src.ctx, &FakeLibvirt::new(Local::Migrating)).is_empty());
            assert_eq!(record(&cloud, &file), before);
            assert_eq!(doubt(&src, &file), None);
        }
        assert!(src.fake.calls().is_empty());
    }

    #[test]
    fn a_guest_seen_nowhere_is_held_with_advice_until_the_destination_reports_it() {
        let cloud = Cloud::new();
        let file = interrupted(&cloud, "cvm2");
        let src = cloud.host("cvm1");
        let before = record(&cloud, &file);
        let absent = FakeLibvirt::new(Local::Absent);
        assert!(reconcile(&src.ctx, &absent).is_empty());
        assert_eq!(record(&cloud, &file), before, "held: nothing changes");
        assert!(
            cloud.pool_names().contains(&file),
            "the memory file is kept"
        );
        let advice = doubt(&src, &file).expect("in doubt");
        assert!(
            advice.contains("cvm2") && advice.contains("kept"),
            "{advice}"
        );
        // The status row carries it.
        let status = crate::ops::status(&src.ctx, Vec::new()).unwrap();
        assert_eq!(
            status.pool,
            format!("directory ({})", src.ctx.cfg.identity.pool_dir.display())
        );
        let row = status.pool_files.iter().find(|r| r.0 == file).unwrap();
        assert!(
            row.2.contains("state=handing-over") && row.2.contains("in doubt"),
            "{row:?}"
        );
        // The destination's vmbeamd comes back and finds the guest running there.
        let dst = cloud.host("cvm2");
        let done = reconcile(&dst.ctx, &FakeLibvirt::new(Local::Running));
        assert_eq!(done.len(), 1, "{done:?}");
        assert_eq!(dst.fake.calls(), ["reset_zero_copy web1"]);
        assert!(BeamPool::new(cloud.pool_dir()).has_ran(&file).unwrap());
        // The source's next pass settles it and forgets the doubt.
        reconcile(&src.ctx, &absent);
        assert_eq!(
            summary(&record(&cloud, &file)),
            (OwnerState::Active, host_id("cvm2"), None, 4)
        );
        assert_eq!(doubt(&src, &file), None);
    }

    #[test]
    fn a_paused_guest_unmarked_is_held_until_resumed_here() {
        let cloud = Cloud::new();
        let file = interrupted(&cloud, "cvm2");
        let src = cloud.host("cvm1");
        let libvirt = FakeLibvirt::new(Local::Paused);
        reconcile(&src.ctx, &libvirt);
        assert!(doubt(&src, &file).unwrap().contains("virsh resume"));
        assert!(
            libvirt.destroyed.borrow().is_empty(),
            "never destroyed without proof"
        );
        assert_eq!(record(&cloud, &file).state, OwnerState::HandingOver);
        // The operator resumes it here: taken back.
        libvirt.local.set(Local::Running);
        reconcile(&src.ctx, &libvirt);
        assert_eq!(
            summary(&record(&cloud, &file)),
            (OwnerState::Active, host_id("cvm1"), None, 3)
        );
        assert_eq!(doubt(&src, &file), None);
    }

    #[test]
    fn the_destination_marks_only_a_guest_running_there_and_only_once() {
        let cloud = Cloud::new();
        let file = interrupted(&cloud, "cvm2");
        let dst = cloud.host("cvm2");
        let pool = BeamPool::new(cloud.pool_dir());
        for local in [Local::Absent, Local::Paused, Local::Migrating] {
            assert!(reconcile(&dst.ctx, &FakeLibvirt::new(local)).is_empty());
            assert!(!pool.has_ran(&file).unwrap(), "{local:?}");
        }
        let running = FakeLibvirt::new(Local::Running);
        assert_eq!(reconcile(&dst.ctx, &running).len(), 1);
        assert!(reconcile(&dst.ctx, &running).is_empty(), "marked once");
        assert_eq!(dst.fake.calls(), ["reset_zero_copy web1"]);
        // The destination never rewrites the source's record.
        assert_eq!(record(&cloud, &file).owner, host_id("cvm1"));
    }

    #[test]
    fn hand_overs_between_other_hosts_are_left_alone() {
        let cloud = Cloud::new();
        let file = interrupted(&cloud, "cvm2");
        BeamPool::new(cloud.pool_dir()).mark_ran(&file).unwrap();
        let other = cloud.host("cvm3");
        let libvirt = FakeLibvirt::new(Local::Running);
        assert!(reconcile(&other.ctx, &libvirt).is_empty());
        assert_eq!(record(&cloud, &file).state, OwnerState::HandingOver);
        assert!(libvirt.destroyed.borrow().is_empty());
    }

    #[test]
    fn a_live_job_and_a_recovery_never_act_on_one_domain_together() {
        let cloud = Cloud::new();
        let file = interrupted(&cloud, "cvm2");
        let src = cloud.host("cvm1");
        BeamPool::new(cloud.pool_dir()).mark_ran(&file).unwrap();
        let out = || Outgoing {
            job: 9,
            pool_file: file.clone(),
            dest: host_id("cvm2"),
        };
        // A job of this daemon is on the domain: recovery keeps out.
        let entry = OutgoingEntry::register(&src.ctx, &uuid(), out()).unwrap();
        assert!(reconcile(&src.ctx, &FakeLibvirt::new(Local::Absent)).is_empty());
        assert_eq!(record(&cloud, &file).state, OwnerState::HandingOver);
        drop(entry);
        // A job that is still planning (in the host-device pool it SHAREs then, before its
        // outgoing entry): recovery keeps out too.
        let planning = crate::engine::MigratingClaim::take(&src.ctx, &uuid(), 9).unwrap();
        assert!(RecoveryClaim::take(&src.ctx, &uuid()).is_none());
        assert!(reconcile(&src.ctx, &FakeLibvirt::new(Local::Absent)).is_empty());
        assert_eq!(record(&cloud, &file).state, OwnerState::HandingOver);
        let other = crate::engine::MigratingClaim::take(&src.ctx, &uuid(), 10);
        assert!(
            matches!(&other, Err(DaemonError::Busy(m)) if m.contains("job 9")),
            "{:?}",
            other.err()
        );
        drop(planning);
        assert!(src.ctx.tables.lock().unwrap().migrating.is_empty());
        // A recovery is on the domain: no job may start.
        let claim = RecoveryClaim::take(&src.ctx, &uuid()).unwrap();
        let refused = OutgoingEntry::register(&src.ctx, &uuid(), out());
        assert!(
            matches!(&refused, Err(DaemonError::Busy(m)) if m.contains("recovering")),
            "{:?}",
            refused.err()
        );
        let refused = crate::engine::MigratingClaim::take(&src.ctx, &uuid(), 11);
        assert!(
            matches!(&refused, Err(DaemonError::Busy(m)) if m.contains("recovering")),
            "{:?}",
            refused.err()
        );
        assert!(
            RecoveryClaim::take(&src.ctx, &uuid()).is_none(),
            "one pass at a time"
        );
        drop(claim);
        assert!(src.ctx.tables.lock().unwrap().recovering.is_empty());
    }
}
