//! The libvirt hook's events, as vmbeamd handles them. Hook handlers never call libvirt
//! (libvirt holds the domain's lock while it runs a hook); they work from the XML libvirt
//! passed, the pool and the private QMP socket, and each is bounded in time.
//!
//! Destination of a migration: `migrate begin` (accept or refuse the ticket, strip it),
//! `prepare begin`, `start begin` (link the RAM path: to the source's pool file only for an
//! accepted zero-copy migration, else to a fresh file), `started begin` (QEMU waits in
//! `inmigrate`: set `x-ignore-shared` for zero-copy and watch the incoming migration to reset
//! it). Any host: `release end` (the owner deletes a pool file whose domain is gone for good).
//!
//! In the host-device pool `migrate begin` verifies the ticket's device share too and runs
//! `DevicePool::accept_share` (the control-page proof through this cloud VM's mapping)
//! instead of looking for a pool file; `start begin` links the RAM path to the shared
//! device's `resource2`; the watcher's "guest runs here" leaves the ran record in the
//! control page and adopts the memory; `release end` of a share that never became this
//! cloud VM's withdraws it (a failed migration).

use std::time::Duration;

use crate::error::DaemonError;
use tracing::{error, info, info_span, warn};
use vmbeam_core::backend::BackendError;
use vmbeam_core::carrier;
use vmbeam_core::device_share::DeviceShare;
use vmbeam_core::hook::{HookOp, HookSubOp};
use vmbeam_core::pool::BeamPool;
use vmbeam_core::ticket::{Expectations, Ticket};
use vmbeam_core::{BeamMetadata, DomainFacts, DomainUuid, HookEvent, HostId};

use crate::devpool::{error_chain, DevicePool, Role};

use crate::guest_pool::Taken;
use crate::state::{now_secs, Incoming, Running, SharedCtx};

fn failed(e: impl std::fmt::Display) -> DaemonError {
    DaemonError::Failed(e.to_string())
}

/// Handles one hook invocation; returns what the hook prints (the XML for `migrate`).
pub fn handle(ctx: &SharedCtx, args: &[String], xml: &str) -> Result<String, DaemonError> {
    let ev = HookEvent::from_args(args).map_err(|e| DaemonError::bad_input("", e))?;
    let passthrough = if ev.output_replaces_xml() {
        xml.to_string()
    } else {
        String::new()
    };
    let meta = match BeamMetadata::from_domain_xml(xml) {
        Ok(Some(m)) => m,
        Ok(None) => return Ok(passthrough),
        Err(e) => return Err(DaemonError::bad_input("VMBeam metadata: ", e)),
    };
    let facts = DomainFacts::from_xml(xml).map_err(|e| DaemonError::bad_input("", e))?;
    let span =
        info_span!("hook", domain = %facts.name, op = %ev.op.as_str(), sub = %ev.sub_op.as_str());
    let _g = span.enter();
    match (&ev.op, &ev.sub_op) {
        (HookOp::Migrate, HookSubOp::Begin) => migrate_begin(ctx, xml, &facts, &meta),
        (HookOp::Start, HookSubOp::Begin) => start_begin(ctx, &facts).map(|_| passthrough),
        (HookOp::Started, HookSubOp::Begin) => started_begin(ctx, &facts).map(|_| passthrough),
        (HookOp::Release, HookSubOp::End) => {
            release_end(ctx, &facts);
            Ok(passthrough)
        }
        _ => Ok(passthrough),
    }
}

/// Destination, before anything is started: verify a ticket if one came with the XML.
fn migrate_begin(
    ctx: &SharedCtx,
    xml: &str,
    facts: &DomainFacts,
    meta: &BeamMetadata,
) -> Result<String, DaemonError> {
    let (clean, ticket) =
        carrier::extract_ticket(xml).map_err(|e| DaemonError::bad_input("", e))?;
    // The host-device pool's part of a ticket never reaches a definition either.
    let (clean, share) =
        carrier::extract_device_share(&clean).map_err(|e| DaemonError::bad_input("", e))?;
    let id = &ctx.cfg.identity;
    let Some(encoded) = ticket else {
        info!("incoming copying migration: the domain gets a fresh pool file here");
        ctx.tables
            .lock()
            .expect("lock")
            .incoming
            .remove(&facts.uuid);
        return owned_here(ctx, &clean, meta, None);
    };
    let ticket = Ticket::decode(&encoded).map_err(DaemonError::Ticket)?;
    if let Some(device) = ctx.pool.device() {
        return migrate_begin_device(ctx, device, &clean, facts, meta, ticket, share);
    }
    if share.is_some() {
        return Err(DaemonError::TicketRefused(
            "the source shares the guest's memory through the primary cloud's devices, but this cloud VM's beam pool is a directory".into(),
        ));
    }
    let pool = BeamPool::new(&id.pool_dir);
    // The pool file must be in our own view of the pool, and be the very file the source
    // named (device and inode), before the ticket counts.
    let identity = pool
        .check_file(&ticket.pool_file, facts.memory_bytes().map_err(failed)?)
        .map_err(|e| {
            DaemonError::TicketRefused(format!(
                "pool file {} in this host's pool: {e}",
                ticket.pool_file
            ))
        })?;
    let expectations = Expectations {
        cloud: &id.cloud,
        dest_host: &id.host_id,
        domain_uuid: &facts.uuid,
        source_host: None,
        pool_identity: Some(identity),
    };
    {
        let mut replay = ctx.replay.lock().expect("lock");
        ticket
            .verify(&ctx.key, &expectations, now_secs(), &mut *replay)
            .map_err(|e| {
                warn!(error = %e, "ticket refused");
                DaemonError::Ticket(e)
            })?;
    }
    info!(source = %ticket.source_host, pool_file = %ticket.pool_file, "ticket accepted: incoming zero-copy migration");
    ctx.tables.lock().expect("lock").incoming.insert(
        facts.uuid.clone(),
        Incoming {
            pool_file: ticket.pool_file.clone(),
            source: ticket.source_host.clone(),
            expires_at: ticket.expires_at,
        },
    );
    owned_here(ctx, &clean, meta, Some(ticket.pool_file))
}

/// `migrate begin` in the host-device pool: the ticket and its device share verified (the
/// share signed by the cloud's key, bound to the ticket and addressed to this cloud VM as
/// the host knows it, the ticket addressed to that id), then the shared device waited for
/// and its control page checked through this cloud VM's own mapping
/// ([`DevicePool::accept_share`]). A device that does not prove is withdrawn at once (no
/// QEMU maps it yet): a refusal leaves nothing here, and the source's job fails in
/// Prepare with the reason.
fn migrate_begin_device(
    ctx: &SharedCtx,
    device: &DevicePool,
    clean: &str,
    facts: &DomainFacts,
    meta: &BeamMetadata,
    ticket: Ticket,
    share: Option<String>,
) -> Result<String, DaemonError> {
    let id = &ctx.cfg.identity;
    let refused = |why: String| {
        warn!(%why, "ticket refused");
        DaemonError::TicketRefused(why)
    };
    let share = share.ok_or_else(|| {
        refused("the ticket comes without a device share: the source's beam pool is a directory, this cloud VM's is host-device".into())
    })?;
    let share = DeviceShare::decode(&share, &ctx.key).map_err(|e| refused(e.to_string()))?;
    let me = device.cloud_vm().map_err(|e| {
        refused(format!(
            "the primary cloud's host cannot say who this cloud VM is: {}",
            error_chain(&e)
        ))
    })?;
    let me_host = HostId::new(me.to_string()).map_err(|e| refused(e.to_string()))?;
    share
        .check(&ticket, &me)
        .map_err(|e| refused(e.to_string()))?;
    let expectations = Expectations {
        cloud: &id.cloud,
        dest_host: &me_host,
        domain_uuid: &facts.uuid,
        source_host: None,
        pool_identity: None,
    };
    {
        let mut replay = ctx.replay.lock().expect("lock");
        ticket
            .verify(&ctx.key, &expectations, now_secs(), &mut *replay)
            .map_err(|e| {
                warn!(error = %e, "ticket refused");
                DaemonError::Ticket(e)
            })?;
    }
    let backing = match device.accept_share(&facts.uuid, &share.placement, &share.proof) {
        Ok(b) => b,
        Err(e) => {
            let why = error_chain(&e);
            let left = match device.holding(&facts.uuid) {
                Ok(Some(h)) if h.role == Role::Destination => match device.withdraw(&facts.uuid) {
                    Ok(()) => "the share was withdrawn".to_string(),
                    Err(w) => format!(
                        "the share could not be withdrawn ({}); recovery withdraws it",
                        error_chain(&w)
                    ),
                },
                _ => "nothing was taken here".to_string(),
            };
            return Err(refused(format!(
                "the shared device does not prove the guest's memory: {why}; {left}"
            )));
        }
    };
    let path = backing.path.display().to_string();
    info!(source = %ticket.source_host, device = %path, proof = %share.proof.nonce, "ticket and device share accepted: incoming zero-copy migration");
    ctx.tables.lock().expect("lock").incoming.insert(
        facts.uuid.clone(),
        Incoming {
            pool_file: path,
            source: ticket.source_host.clone(),
            expires_at: ticket.expires_at,
        },
    );
    owned_here(ctx, clean, meta, None)
}

/// The incoming domain's XML with its metadata saying this host owns it now (the pool's
/// owner records stay the truth; the metadata follows them).
fn owned_here(
    ctx: &SharedCtx,
    xml: &str,
    meta: &BeamMetadata,
    pool_file: Option<String>,
) -> Result<String, DaemonError> {
    let id = &ctx.cfg.identity;
    let moved = BeamMetadata {
        cloud: id.cloud.clone(),
        pool: id.pool_dir.clone(),
        pool_file,
        ..meta
            .handed_to(id.host_id.clone())
            .map_err(|e| DaemonError::bad_input("VMBeam metadata: ", e))?
    };
    vmbeam_core::transform::enable(xml, &moved, &ctx.cfg.qmp_dir)
        .map(|r| r.xml)
        .map_err(|e| DaemonError::bad_input("incoming domain XML: ", e))
}

fn backend_err(e: BackendError) -> DaemonError {
    DaemonError::Backend(e)
}

/// Any start: link libvirt's RAM path to memory of the full size: the source's pool file
/// for an accepted zero-copy migration, else fresh memory from the pool (a pool file, or a
/// device from the primary cloud's host).
fn start_begin(ctx: &SharedCtx, facts: &DomainFacts) -> Result<(), DaemonError> {
    let id = &ctx.cfg.identity;
    let size = facts.memory_bytes().map_err(failed)?;
    if facts.numa_cells > 0 {
        return Err(DaemonError::CannotEnable(
            "guest NUMA cells are not supported by VMBeam".into(),
        ));
    }
    let incoming = {
        let mut t = ctx.tables.lock().expect("lock");
        t.incoming
            .remove(&facts.uuid)
            .filter(|i| i.expires_at + 60 >= now_secs())
    };
    let (taken, zero_copy) = match incoming {
        Some(inc) => (
            Taken {
                path: id.pool_dir.join(&inc.pool_file),
                name: inc.pool_file,
            },
            true,
        ),
        None => (ctx.pool.take(&ctx.cfg, &facts.uuid, size)?, false),
    };
    ctx.backend
        .link_ram(facts, &taken.path, size)
        .map_err(|e| {
            if !zero_copy {
                ctx.pool.undo_take(&ctx.cfg, &facts.uuid, &taken);
            }
            backend_err(e)
        })?;
    info!(pool_file = %taken.name, zero_copy, pool = ctx.pool.kind(), "RAM path linked into the pool");
    ctx.tables.lock().expect("lock").running.insert(
        facts.uuid.clone(),
        Running {
            pool_file: taken.name,
            zero_copy,
        },
    );
    Ok(())
}

/// QEMU is up and waiting for the stream. For zero-copy: `x-ignore-shared` on, then a watcher
/// that resets it when the incoming migration is over.
fn started_begin(ctx: &SharedCtx, facts: &DomainFacts) -> Result<(), DaemonError> {
    crate::fault::hold("started");
    let zero_copy = ctx
        .tables
        .lock()
        .expect("lock")
        .running
        .get(&facts.uuid)
        .map(|r| r.zero_copy)
        .unwrap_or(false);
    if !zero_copy {
        return Ok(());
    }
    let Some(pool_file) = ctx
        .tables
        .lock()
        .expect("lock")
        .running
        .get(&facts.uuid)
        .map(|r| r.pool_file.clone())
    else {
        return Ok(());
    };
    let pool_path = ctx.cfg.identity.pool_dir.join(&pool_file);
    if ctx.pool.device().is_some() {
        // The host-device pool: the ran record goes into the control page (the source
        // reads it through its own mapping), and this cloud VM owns the guest's memory
        // from then on.
        let (ctx2, guest) = (ctx.clone(), facts.uuid.clone());
        return ctx
            .backend
            .arm_destination(
                facts,
                &pool_path,
                Box::new(move || {
                    if let Some(device) = ctx2.pool.device() {
                        if let Err(e) = device.mark_ran(&guest) {
                            error!(error = %error_chain(&e), "the guest runs here but the control page could not be marked: a failing source will not know to fence itself");
                        }
                    }
                }),
            )
            .map_err(backend_err);
    }
    // Once the guest has run here, the source must never run it again: leave the pool's
    // marker for the source's failure path.
    let pool = BeamPool::new(&ctx.cfg.identity.pool_dir);
    ctx.backend
        .arm_destination(
            facts,
            &pool_path,
            Box::new(move || {
                if let Err(e) = pool.mark_ran(&pool_file) {
                    error!(%pool_file, error = %e, "the guest runs here but the pool could not be marked: a failing source will not know to fence itself");
                }
            }),
        )
        .map_err(backend_err)
}

/// The domain is gone from this host. Its pool file is deleted only by its owner, and only
/// when no outgoing zero-copy migration still needs to settle who owns it.
fn release_end(ctx: &SharedCtx, facts: &DomainFacts) {
    crate::fault::hold("release");
    remove_private_monitor_socket(facts);
    let (running, outgoing) = {
        let mut t = ctx.tables.lock().expect("lock");
        t.incoming.remove(&facts.uuid);
        (
            t.running.remove(&facts.uuid),
            t.outgoing.contains_key(&facts.uuid),
        )
    };
    if outgoing {
        info!("released while a zero-copy migration is in flight: the job settles the pool file");
        return;
    }
    ctx.pool
        .give_back(&ctx.cfg, &facts.uuid, running.map(|r| r.pool_file));
}

/// The domain's QEMU is gone from this host: its private QMP socket (VMBeam's, so libvirt
/// does not clean it) goes too. QEMU unlinks it when it exits normally; a killed QEMU
/// leaves it behind. Only a socket is removed, never anything else at that path.
fn remove_private_monitor_socket(facts: &DomainFacts) {
    use std::os::unix::fs::FileTypeExt;
    let Some(sock) = &facts.private_qmp else {
        return;
    };
    match std::fs::symlink_metadata(sock) {
        Ok(m) if m.file_type().is_socket() => match std::fs::remove_file(sock) {
            Ok(()) => {
                info!(socket = %sock.display(), "a dead QEMU's private monitor socket removed")
            }
            Err(e) => {
                warn!(socket = %sock.display(), error = %e, "cannot remove the private monitor socket")
            }
        },
        _ => {}
    }
}

/// Pool files this host owns whose domain libvirt no longer knows (after a crash).
pub fn orphan_report(ctx: &SharedCtx, live: &std::collections::HashSet<DomainUuid>) -> Vec<String> {
    let pool = BeamPool::new(&ctx.cfg.identity.pool_dir);
    pool.orphans(&ctx.cfg.identity.host_id, live)
        .map(|v| v.into_iter().map(|e| e.file_name).collect())
        .unwrap_or_default()
}

/// How old a file in the pool must be before start-up reports it as left behind (younger
/// ones may belong to a migration in flight between other cloud VMs sharing the pool).
pub const LEFTOVER_MIN_AGE: Duration = Duration::from_secs(60);

/// Files in the pool that crashed processes left behind ([`BeamPool::leftovers`]), logged
/// (never deleted: the pool is shared, and the owner settles its own files).
pub fn report_leftovers(ctx: &SharedCtx) -> Vec<std::path::PathBuf> {
    match BeamPool::new(&ctx.cfg.identity.pool_dir).leftovers(LEFTOVER_MIN_AGE) {
        Ok(files) => {
            if !files.is_empty() {
                warn!(
                    ?files,
                    "files left in the pool by crashed processes (not deleted)"
                );
            }
            files
        }
        Err(e) => {
            warn!(pool = %ctx.cfg.identity.pool_dir.display(), error = %e, "cannot look for leftovers in the pool");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    //! The destination's hook handlers and `release end`, without libvirt: a fake backend,
    //! a temporary pool shared with the source.

    use std::sync::atomic::Ordering;

    use vmbeam_core::pool::{pool_file_name, OwnerState, PoolError};
    use vmbeam_core::ticket::TicketFields;
    use vmbeam_core::{CloudId, HostId, TicketKey};

    use super::*;
    use crate::state::Outgoing;
    use crate::testing::{domain_xml, host_id, key, uuid, Cloud, Host, CLOUD, MEMORY};

    fn args(op: &str, sub: &str) -> Vec<String> {
        ["web1", op, sub, "-"].map(String::from).to_vec()
    }

    struct Issue {
        key: TicketKey,
        dest: HostId,
        file: String,
        issued: u64,
        domain: DomainUuid,
    }

    /// The source's XML for the destination: the domain with a ticket in its metadata.
    fn with_ticket(cloud: &Cloud, i: Issue) -> String {
        let identity = vmbeam_core::pool::file_identity(&cloud.pool_dir().join(&i.file))
            .unwrap_or(vmbeam_core::FileIdentity { dev: 0, ino: 0 });
        let ticket = Ticket::issue(
            &i.key,
            TicketFields {
                cloud: CloudId::new(CLOUD).unwrap(),
                domain_uuid: i.domain,
                domain_name: "web1".into(),
                pool_file: i.file,
                pool_identity: identity,
                source_host: host_id("cvm1"),
                dest_host: i.dest,
                ttl_secs: 60,
            },
            i.issued,
        )
        .unwrap()
        .encode()
        .unwrap();
        carrier::insert_ticket(&domain_xml("cvm1"), &ticket).unwrap()
    }

    fn good(file: &str) -> Issue {
        Issue {
            key: key(),
            dest: host_id("cvm2"),
            file: file.into(),
            issued: now_secs(),
            domain: uuid(),
        }
    }

    /// Everything a refused ticket must leave as it was.
    fn snapshot(cloud: &Cloud, h: &Host) -> (Vec<String>, usize, usize, Vec<String>) {
        let t = h.ctx.tables.lock().unwrap();
        (
            cloud.pool_names(),
            t.incoming.len(),
            t.running.len(),
            h.fake.calls(),
        )
    }

    #[test]
    fn migrate_begin_accepts_a_good_ticket_and_strips_it() {
        let cloud = Cloud::new();
        let file = cloud.source_file();
        let dst = cloud.host("cvm2");
        let xml = handle(
            &dst.ctx,
            &args("migrate", "begin"),
            &with_ticket(&cloud, good(&file)),
        )
        .unwrap();
        assert!(carrier::extract_ticket(&xml).unwrap().1.is_none());
        let meta = BeamMetadata::from_domain_xml(&xml).unwrap().unwrap();
        assert_eq!(
            (meta.owner, meta.generation, meta.pool_file.as_deref()),
            (host_id("cvm2"), 4, Some(file.as_str()))
        );
        let t = dst.ctx.tables.lock().unwrap();
        assert_eq!(
            t.incoming.get(&uuid()).map(|i| i.pool_file.as_str()),
            Some(file.as_str())
        );
    }

    #[test]
    fn migrate_begin_refuses_a_bad_or_replayed_ticket_and_changes_nothing() {
        let cloud = Cloud::new();
        let file = cloud.source_file();
        let dst = cloud.host("cvm2");
        let other_domain = DomainUuid::new("00000000-0000-4000-8000-000000000001").unwrap();
        let cases: Vec<(&str, Issue)> = vec![
            (
                "another cloud's key",
                Issue {
                    key: TicketKey::from_bytes(vec![9; 32]).unwrap(),
                    ..good(&file)
                },
            ),
            (
                "another destination",
                Issue {
                    dest: host_id("cvm3"),
                    ..good(&file)
                },
            ),
            (
                "expired",
                Issue {
                    issued: now_secs() - 3600,
                    ..good(&file)
                },
            ),
            (
                "another domain",
                Issue {
                    domain: other_domain,
                    ..good(&file)
                },
            ),
            (
                "a pool file not in this pool",
                Issue {
                    file: pool_file_name(&uuid(), 9),
                    ..good(&file)
                },
            ),
        ];
        let before = snapshot(&cloud, &dst);
        for (what, issue) in cases {
            let r = handle(
                &dst.ctx,
                &args("migrate", "begin"),
                &with_ticket(&cloud, issue),
            );
            assert!(
                matches!(
                    r,
                    Err(DaemonError::TicketRefused(_) | DaemonError::Ticket(_))
                ),
                "{what}: {r:?}"
            );
            assert_eq!(snapshot(&cloud, &dst), before, "{what}");
        }
        // A pool file of the wrong size (not the guest's memory) is refused too.
        let pool = BeamPool::new(cloud.pool_dir());
        pool.create_file(&uuid(), 5, MEMORY * 2, None).unwrap();
        let before = snapshot(&cloud, &dst);
        let wrong = Issue {
            file: pool_file_name(&uuid(), 5),
            ..good(&file)
        };
        let r = handle(
            &dst.ctx,
            &args("migrate", "begin"),
            &with_ticket(&cloud, wrong),
        );
        assert!(
            matches!(
                r,
                Err(DaemonError::TicketRefused(_) | DaemonError::Ticket(_))
            ),
            "{r:?}"
        );
        assert_eq!(snapshot(&cloud, &dst), before);
        // A garbled ticket.
        let garbled = carrier::insert_ticket(&domain_xml("cvm1"), "vmbt1.AAAA").unwrap();
        let r = handle(&dst.ctx, &args("migrate", "begin"), &garbled);
        assert!(
            matches!(
                r,
                Err(DaemonError::TicketRefused(_) | DaemonError::Ticket(_))
            ),
            "{r:?}"
        );
        assert_eq!(snapshot(&cloud, &dst), before);

        // A replayed ticket: accepted once, refused the second time, nothing recorded then.
        let xml = with_ticket(&cloud, good(&file));
        handle(&dst.ctx, &args("migrate", "begin"), &xml).unwrap();
        dst.ctx.tables.lock().unwrap().incoming.clear();
        let before = snapshot(&cloud, &dst);
        let r = handle(&dst.ctx, &args("migrate", "begin"), &xml);
        assert!(
            matches!(&r, Err(e @ DaemonError::Ticket(_)) if e.to_string().contains("already used")),
            "{r:?}"
        );
        assert_eq!(snapshot(&cloud, &dst), before);
    }

    #[test]
    fn start_links_the_sources_file_only_for_an_accepted_ticket() {
        let cloud = Cloud::new();
        let file = cloud.source_file();
        let dst = cloud.host("cvm2");
        handle(
            &dst.ctx,
            &args("migrate", "begin"),
            &with_ticket(&cloud, good(&file)),
        )
        .unwrap();
        let xml = domain_xml("cvm2");
        assert_eq!(handle(&dst.ctx, &args("start", "begin"), &xml).unwrap(), "");
        assert_eq!(dst.fake.calls(), [format!("link_ram {file} {MEMORY}")]);
        {
            let t = dst.ctx.tables.lock().unwrap();
            assert!(t.incoming.is_empty(), "an acceptance is used once");
            let r = t.running.get(&uuid()).unwrap();
            assert!(r.zero_copy && r.pool_file == file);
        }
        // No new file: the source's is used as it is (still the source's until it settles).
        assert_eq!(cloud.pool_names(), [file.clone(), format!("{file}.owner")]);
        assert_eq!(
            BeamPool::new(cloud.pool_dir())
                .read_owner(&file)
                .unwrap()
                .unwrap()
                .owner,
            host_id("cvm1")
        );
    }

    #[test]
    fn any_other_start_gets_a_fresh_file_of_its_own() {
        let cloud = Cloud::new();
        let file = cloud.source_file();
        let dst = cloud.host("cvm2");
        // An acceptance whose ticket expired long ago does not count.
        dst.ctx.tables.lock().unwrap().incoming.insert(
            uuid(),
            Incoming {
                pool_file: file.clone(),
                source: host_id("cvm1"),
                expires_at: 0,
            },
        );
        handle(&dst.ctx, &args("start", "begin"), &domain_xml("cvm2")).unwrap();
        let fresh = pool_file_name(&uuid(), 4);
        assert_eq!(dst.fake.calls(), [format!("link_ram {fresh} {MEMORY}")]);
        let pool = BeamPool::new(cloud.pool_dir());
        let r = pool.read_owner(&fresh).unwrap().unwrap();
        assert_eq!((r.owner, r.state), (host_id("cvm2"), OwnerState::Active));
        assert_eq!(pool.check_file(&fresh, MEMORY).map(|_| ()).ok(), Some(()));
        assert!(!dst.ctx.tables.lock().unwrap().running[&uuid()].zero_copy);
    }

    #[test]
    fn started_marks_the_pool_once_the_guest_runs_on_a_zero_copy_destination() {
        let cloud = Cloud::new();
        let file = cloud.source_file();
        let dst = cloud.host("cvm2");
        let pool = BeamPool::new(cloud.pool_dir());
        dst.fake.guest_runs_at_once.store(true, Ordering::SeqCst);
        // A copying start: nothing to arm, no marker.
        dst.ctx.tables.lock().unwrap().running.insert(
            uuid(),
            Running {
                pool_file: file.clone(),
                zero_copy: false,
            },
        );
        handle(&dst.ctx, &args("started", "begin"), &domain_xml("cvm2")).unwrap();
        assert!(dst.fake.calls().is_empty());
        assert!(!pool.has_ran(&file).unwrap());
        // A zero-copy start: armed, and the marker once the guest runs.
        dst.ctx.tables.lock().unwrap().running.insert(
            uuid(),
            Running {
                pool_file: file.clone(),
                zero_copy: true,
            },
        );
        handle(&dst.ctx, &args("started", "begin"), &domain_xml("cvm2")).unwrap();
        assert_eq!(dst.fake.calls(), [format!("arm_destination {file}")]);
        assert!(pool.has_ran(&file).unwrap());
    }

    fn release(h: &Host) {
        handle(&h.ctx, &args("release", "end"), &domain_xml("cvm1")).unwrap();
    }

    #[test]
    fn release_end_deletes_its_own_file_and_clears_the_marker() {
        let cloud = Cloud::new();
        let file = cloud.source_file();
        let src = cloud.host("cvm1");
        let pool = BeamPool::new(cloud.pool_dir());
        pool.mark_ran(&file).unwrap();
        src.ctx.tables.lock().unwrap().running.insert(
            uuid(),
            Running {
                pool_file: file.clone(),
                zero_copy: false,
            },
        );
        release(&src);
        assert!(cloud.pool_names().is_empty(), "{:?}", cloud.pool_names());
        assert!(src.ctx.tables.lock().unwrap().running.is_empty());
    }

    #[test]
    fn release_end_leaves_the_file_while_a_migration_settles_and_others_files() {
        let cloud = Cloud::new();
        let file = cloud.source_file();
        let src = cloud.host("cvm1");
        let pool = BeamPool::new(cloud.pool_dir());
        pool.mark_ran(&file).unwrap();
        src.ctx.tables.lock().unwrap().outgoing.insert(
            uuid(),
            Outgoing {
                job: 1,
                pool_file: file.clone(),
                dest: host_id("cvm2"),
            },
        );
        let before = cloud.pool_names();
        release(&src);
        assert_eq!(cloud.pool_names(), before, "the job settles the file");
        assert!(pool.has_ran(&file).unwrap());
        // Another host's file is never deleted here.
        src.ctx.tables.lock().unwrap().outgoing.clear();
        let dst = cloud.host("cvm2");
        release(&dst);
        assert_eq!(cloud.pool_names(), before, "not cvm2's file");
        // A file being handed over is not released by its owner either.
        pool.begin_hand_over(&file, &host_id("cvm1"), &host_id("cvm2"))
            .unwrap();
        release(&src);
        assert_eq!(cloud.pool_names(), before);
        assert!(matches!(
            pool.release(&file, &host_id("cvm1")),
            Err(PoolError::WrongState { .. })
        ));
    }

    #[test]
    fn a_dead_qemus_private_monitor_socket_goes_and_nothing_else_at_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join(format!("{}.sock", uuid()));
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let mut f = crate::testing::facts();
        f.private_qmp = Some(sock.clone());
        remove_private_monitor_socket(&f);
        assert!(!sock.exists(), "the socket is removed");
        std::fs::write(&sock, b"not a socket").unwrap();
        remove_private_monitor_socket(&f);
        assert!(sock.exists(), "only a socket is ever removed");
    }

    /// The host-device pool: a start takes the guest's memory from the primary cloud's host
    /// (its device's BAR 2 is what the RAM path links to), the domain gone gives it back,
    /// and nothing is left on the host; the shared directory is not touched.
    #[test]
    fn a_device_pool_start_takes_memory_from_the_host_and_release_gives_it_back() {
        use crate::host_fixture::{HostFixture, A1};
        let host = HostFixture::new();
        let cloud = Cloud::new();
        let cvm = cloud.device_host("cvm1", &host, A1);
        handle(&cvm.ctx, &args("start", "begin"), &domain_xml("cvm1")).unwrap();
        assert_eq!(cvm.fake.calls(), [format!("link_ram resource2 {MEMORY}")]);
        let attached = host.attached();
        assert_eq!(attached.len(), 1);
        assert_eq!(attached[0].0, A1);
        assert_eq!(host.files().len(), 1);
        let running = cvm.ctx.tables.lock().unwrap().running[&uuid()].clone();
        assert!(!running.zero_copy);
        assert!(running
            .pool_file
            .starts_with(host.pci_devices(A1).to_str().unwrap()));
        assert!(std::path::Path::new(&running.pool_file).exists());
        let device = cvm.ctx.pool.device().unwrap();
        assert_eq!(device.holdings().unwrap().len(), 1);
        assert!(
            cloud.pool_names().is_empty(),
            "the shared directory is not used"
        );

        handle(&cvm.ctx, &args("release", "end"), &domain_xml("cvm1")).unwrap();
        assert!(host.attached().is_empty());
        assert!(host.files().is_empty(), "nothing left on the host");
        assert!(device.holdings().unwrap().is_empty());
        assert!(cvm.ctx.tables.lock().unwrap().running.is_empty());
    }

    #[test]
    fn a_device_pool_start_that_fails_gives_the_memory_back_and_a_host_that_refuses_fails_it() {
        use crate::host_fixture::{HostFixture, A1};
        let host = HostFixture::new();
        let cloud = Cloud::new();
        let cvm = cloud.device_host("cvm1", &host, A1);
        cvm.fake.refuse_link_ram.store(true, Ordering::SeqCst);
        let err = handle(&cvm.ctx, &args("start", "begin"), &domain_xml("cvm1")).unwrap_err();
        assert!(err.to_string().contains("cannot link"), "{err}");
        assert!(host.attached().is_empty());
        assert!(host.files().is_empty());
        assert!(cvm
            .ctx
            .pool
            .device()
            .unwrap()
            .holdings()
            .unwrap()
            .is_empty());
        assert!(cvm.ctx.tables.lock().unwrap().running.is_empty());

        // A guest too big for the cloud VM's 64 GiB window: the host refuses, the start
        // fails with its words, and nothing is taken.
        cvm.fake.refuse_link_ram.store(false, Ordering::SeqCst);
        let huge = domain_xml("cvm1").replace(
            "<memory unit='KiB'>4096</memory>",
            "<memory unit='KiB'>68719476736</memory>",
        );
        let err = handle(&cvm.ctx, &args("start", "begin"), &huge).unwrap_err();
        assert!(err.to_string().contains("host-device pool"), "{err}");
        assert!(host.attached().is_empty());
        assert!(cvm
            .ctx
            .pool
            .device()
            .unwrap()
            .holdings()
            .unwrap()
            .is_empty());
        assert_eq!(
            cvm.fake.calls().len(),
            1,
            "QEMU's RAM path was not linked again"
        );
    }

    #[test]
    fn domains_without_vmbeam_metadata_pass_through_untouched() {
        let cloud = Cloud::new();
        let dst = cloud.host("cvm2");
        let plain = "<domain type='qemu'><name>x</name></domain>";
        assert_eq!(
            handle(&dst.ctx, &args("migrate", "begin"), plain).unwrap(),
            plain
        );
        assert_eq!(
            handle(&dst.ctx, &args("start", "begin"), plain).unwrap(),
            ""
        );
        assert!(dst.fake.calls().is_empty());
        assert!(cloud.pool_names().is_empty());
    }
}

#[cfg(test)]
mod hostile_tests {
    //! `release end` and the leftover report on a pool that other cloud VMs may have
    //! tampered with: only names in the pool are ever deleted, never what they point at,
    //! nothing is deleted on a record that cannot be trusted, and nothing blocks.

    use std::fs;
    use std::os::unix::fs::symlink;

    use vmbeam_core::pool::{
        classify, pool_file_name, PoolFileKind, RDV_REQ_SUFFIX, RDV_RESP_SUFFIX,
    };
    use vmbeam_core::Nonce;

    use super::*;
    use crate::hostile_support::{age, mkfifo, names, within, Outside};
    use crate::testing::{domain_xml, uuid, Cloud};

    fn release(ctx: &SharedCtx) {
        let args = ["web1", "release", "end", "-"].map(String::from);
        handle(ctx, &args, &domain_xml("cvm1")).unwrap();
    }

    fn running(ctx: &SharedCtx, pool_file: &str) {
        ctx.tables.lock().unwrap().running.insert(
            uuid(),
            Running {
                pool_file: pool_file.to_owned(),
                zero_copy: false,
            },
        );
    }

    #[test]
    fn release_end_unlinks_links_in_the_pool_never_what_they_point_at() {
        for hard in [false, true] {
            let cloud = Cloud::new();
            let file = cloud.source_file();
            let src = cloud.host("cvm1");
            let memory = Outside::new(b"another guest's memory");
            let marker = Outside::new(b"another marker");
            let link = |target: &std::path::Path, at: std::path::PathBuf| {
                if hard {
                    fs::hard_link(target, at).unwrap();
                } else {
                    symlink(target, at).unwrap();
                }
            };
            // The pool file and its ran marker are links to files outside the pool.
            fs::remove_file(cloud.pool_dir().join(&file)).unwrap();
            link(&memory.file, cloud.pool_dir().join(&file));
            link(&marker.file, cloud.pool_dir().join(format!("{file}.ran")));
            running(&src.ctx, &file);
            release(&src.ctx);
            assert!(cloud.pool_names().is_empty(), "{:?}", cloud.pool_names());
            memory.assert_untouched();
            marker.assert_untouched();
        }
    }

    /// Followed or trusted, each of these records would name cvm1 the active owner of the
    /// pool file, and `release end` would delete it.
    #[test]
    fn release_end_deletes_nothing_on_a_record_it_cannot_trust() {
        for what in ["symlink", "FIFO", "directory", "another file's", "garbage"] {
            within(&format!("release end, record: {what}"), move || {
                let cloud = Cloud::new();
                let file = cloud.source_file();
                let src = cloud.host("cvm1");
                let rec = cloud.pool_dir().join(format!("{file}.owner"));
                let good = fs::read(&rec).unwrap();
                let outside = Outside::new(&good);
                fs::remove_file(&rec).unwrap();
                match what {
                    "symlink" => symlink(&outside.file, &rec).unwrap(),
                    "FIFO" => mkfifo(&rec),
                    "directory" => fs::create_dir(&rec).unwrap(),
                    "another file's" => {
                        let other = pool_file_name(&uuid(), 9);
                        let text = String::from_utf8(good.clone()).unwrap();
                        fs::write(&rec, text.replace(&file, &other)).unwrap();
                    }
                    _ => fs::write(&rec, b"\xff{\"owner\":").unwrap(),
                }
                let before = cloud.pool_names();
                running(&src.ctx, &file);
                release(&src.ctx);
                assert_eq!(cloud.pool_names(), before, "{what}");
                outside.assert_untouched();
            });
        }
    }

    /// A pool file name in the daemon's tables that is no plain name (it came through a
    /// ticket or the metadata) never reaches outside the pool.
    #[test]
    fn release_end_never_leaves_the_pool_for_a_bad_name() {
        let cloud = Cloud::new();
        let src = cloud.host("cvm1");
        // What `../x` would reach: a file beside the pool with a record naming cvm1 its
        // active owner under that very name.
        let beside = cloud.dir.path();
        fs::write(beside.join("x"), "beside the pool").unwrap();
        let record = format!(
            r#"{{"owner":"cvm1","domain_uuid":"{}","generation":3,"pool_file":"../x","state":"active"}}"#,
            crate::testing::UUID
        );
        fs::write(beside.join("x.owner"), record).unwrap();
        let before = names(beside);
        for bad in ["../x", "", ".", "..", "/x", "a/../../x"] {
            running(&src.ctx, bad);
            release(&src.ctx);
            assert_eq!(names(beside), before, "{bad:?}");
            assert!(cloud.pool_names().is_empty(), "{bad:?}");
            assert!(src.ctx.tables.lock().unwrap().running.is_empty());
        }
    }

    #[test]
    fn leftovers_are_reported_never_deleted_and_never_block() {
        let (names_before, reported, expected) = within("report_leftovers", || {
            let cloud = Cloud::new();
            let file = cloud.source_file();
            let dir = cloud.pool_dir();
            let outside = Outside::new(b"someone else's file");
            let n = Nonce::random();
            let mut expected = Vec::new();
            let mut planted = |name: String, how: &dyn Fn(&std::path::Path)| {
                let path = dir.join(&name);
                how(&path);
                age(&path);
                if classify(&name) != PoolFileKind::Foreign {
                    expected.push(path);
                }
            };
            planted(format!("{n}{RDV_REQ_SUFFIX}"), &|p| mkfifo(p));
            planted(format!("{n}{RDV_RESP_SUFFIX}"), &|p| {
                symlink(&outside.file, p).unwrap()
            });
            planted(format!("{n}.proof"), &|p| fs::create_dir(p).unwrap());
            planted(format!(".{file}.owner.0011.tmp"), &|p| {
                symlink(outside.dir.path(), p).unwrap()
            });
            planted(format!("{file}.ran"), &|p| mkfifo(p));
            planted("README".into(), &|p| mkfifo(p));
            expected.sort();
            let before = cloud.pool_names();
            let src = cloud.host("cvm1");
            let reported = report_leftovers(&src.ctx);
            outside.assert_untouched();
            (before == cloud.pool_names(), reported, expected)
        });
        assert!(names_before, "the leftover report deleted something");
        assert_eq!(reported, expected);
    }
}
