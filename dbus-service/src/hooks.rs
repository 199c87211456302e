//! The libvirt hook's events, as vmbeamd handles them. Hook handlers never call libvirt
//! (libvirt holds the domain's lock while it runs a hook); they work from the XML libvirt
//! passed, the pool and the private QMP socket, and each is bounded in time.
//!
//! Destination of a migration: `migrate begin` (accept or refuse the ticket, strip it),
//! `prepare begin`, `start begin` (link the RAM path: to the source's pool file only for an
//! accepted zero-copy migration, else to a fresh file), `started begin` (QEMU waits in
//! `inmigrate`: set `x-ignore-shared` for zero-copy and watch the incoming migration to reset
//! it). Any host: `release end` (the owner deletes a pool file whose domain is gone for good).

use std::time::Duration;

use tracing::{error, info, info_span, warn};
use vmbeam_bus::BeamError;
use vmbeam_core::backend::BackendError;
use vmbeam_core::carrier;
use vmbeam_core::hook::{HookOp, HookSubOp};
use vmbeam_core::pool::{BeamPool, OwnerState};
use vmbeam_core::ticket::{Expectations, Ticket};
use vmbeam_core::{BeamMetadata, DomainFacts, DomainUuid, HookEvent};

use crate::state::{now_secs, Incoming, Running, SharedCtx};

fn failed(e: impl std::fmt::Display) -> BeamError {
    BeamError::Failed(e.to_string())
}

/// Handles one hook invocation; returns what the hook prints (the XML for `migrate`).
pub fn handle(ctx: &SharedCtx, args: &[String], xml: &str) -> Result<String, BeamError> {
    let ev = HookEvent::from_args(args).map_err(|e| BeamError::InvalidArgs(e.to_string()))?;
    let passthrough = if ev.output_replaces_xml() {
        xml.to_string()
    } else {
        String::new()
    };
    let meta = match BeamMetadata::from_domain_xml(xml) {
        Ok(Some(m)) => m,
        Ok(None) => return Ok(passthrough),
        Err(e) => return Err(BeamError::InvalidArgs(format!("VMBeam metadata: {e}"))),
    };
    let facts = DomainFacts::from_xml(xml).map_err(|e| BeamError::InvalidArgs(e.to_string()))?;
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
) -> Result<String, BeamError> {
    let (clean, ticket) =
        carrier::extract_ticket(xml).map_err(|e| BeamError::InvalidArgs(e.to_string()))?;
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
    let ticket = Ticket::decode(&encoded).map_err(|e| BeamError::TicketRefused(e.to_string()))?;
    let pool = BeamPool::new(&id.pool_dir);
    // The pool file must be in our own view of the pool, and be the very file the source
    // named (device and inode), before the ticket counts.
    let identity = pool
        .check_file(&ticket.pool_file, facts.memory_bytes().map_err(failed)?)
        .map_err(|e| {
            BeamError::TicketRefused(format!(
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
                BeamError::TicketRefused(e.to_string())
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

/// The incoming domain's XML with its metadata saying this host owns it now (the pool's
/// owner records stay the truth; the metadata follows them).
fn owned_here(
    ctx: &SharedCtx,
    xml: &str,
    meta: &BeamMetadata,
    pool_file: Option<String>,
) -> Result<String, BeamError> {
    let id = &ctx.cfg.identity;
    let moved = BeamMetadata {
        cloud: id.cloud.clone(),
        pool: id.pool_dir.clone(),
        pool_file,
        ..meta
            .handed_to(id.host_id.clone())
            .map_err(|e| BeamError::InvalidArgs(format!("VMBeam metadata: {e}")))?
    };
    vmbeam_core::transform::enable(xml, &moved, &ctx.cfg.qmp_dir)
        .map(|r| r.xml)
        .map_err(|e| BeamError::InvalidArgs(format!("incoming domain XML: {e}")))
}

/// Fault injection for tests: if `/run/vmbeam/fault-delay-<point>-ms` exists, the hook
/// waits that long at `<point>` (with QEMU started and waiting for the stream), which gives
/// a test a window to kill a destination QEMU or abort the job. Absent in production.
fn fault_delay(point: &str) {
    let path = format!("/run/vmbeam/fault-delay-{point}-ms");
    if let Some(ms) = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    {
        warn!(ms, "fault injection: delaying the {point} hook");
        std::thread::sleep(Duration::from_millis(ms.min(60_000)));
    }
}

fn backend_err(e: BackendError) -> BeamError {
    match e {
        BackendError::Refused(m) => BeamError::ZeroCopyRefused(m),
        BackendError::Failed(m) => BeamError::Failed(m),
    }
}

/// Any start: link libvirt's RAM path to a pool file that exists with the full size.
fn start_begin(ctx: &SharedCtx, facts: &DomainFacts) -> Result<(), BeamError> {
    let id = &ctx.cfg.identity;
    let pool = BeamPool::new(&id.pool_dir);
    let size = facts.memory_bytes().map_err(failed)?;
    if facts.numa_cells > 0 {
        return Err(BeamError::CannotEnable(
            "guest NUMA cells are not supported by VMBeam".into(),
        ));
    }
    let incoming = {
        let mut t = ctx.tables.lock().expect("lock");
        t.incoming
            .remove(&facts.uuid)
            .filter(|i| i.expires_at + 60 >= now_secs())
    };
    let (file, zero_copy) = match incoming {
        Some(inc) => (inc.pool_file, true),
        None => {
            let generation = next_generation(&pool, &facts.uuid)?;
            pool.create_file(&facts.uuid, generation, size, None)
                .map_err(failed)?;
            let name = vmbeam_core::pool::pool_file_name(&facts.uuid, generation);
            pool.claim(&name, &facts.uuid, generation, &id.host_id)
                .map_err(failed)?;
            (name, false)
        }
    };
    let target = id.pool_dir.join(&file);
    ctx.backend.link_ram(facts, &target, size).map_err(|e| {
        if !zero_copy {
            let _ = pool.release(&file, &id.host_id);
        }
        backend_err(e)
    })?;
    info!(pool_file = %file, zero_copy, "RAM path linked into the pool");
    ctx.tables.lock().expect("lock").running.insert(
        facts.uuid.clone(),
        Running {
            pool_file: file,
            zero_copy,
        },
    );
    Ok(())
}

fn next_generation(pool: &BeamPool, uuid: &DomainUuid) -> Result<u64, BeamError> {
    let max = pool
        .list()
        .map_err(failed)?
        .into_iter()
        .filter(|e| &e.domain_uuid == uuid)
        .map(|e| e.generation)
        .max()
        .unwrap_or(0);
    Ok(max + 1)
}

/// QEMU is up and waiting for the stream. For zero-copy: `x-ignore-shared` on, then a watcher
/// that resets it when the incoming migration is over.
fn started_begin(ctx: &SharedCtx, facts: &DomainFacts) -> Result<(), BeamError> {
    fault_delay("started");
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
    let id = &ctx.cfg.identity;
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
    let pool = BeamPool::new(&id.pool_dir);
    let mut files: Vec<String> = running.map(|r| vec![r.pool_file]).unwrap_or_default();
    if let Ok(list) = pool.list() {
        for e in list {
            if e.domain_uuid == facts.uuid && !files.contains(&e.file_name) {
                files.push(e.file_name);
            }
        }
    }
    for f in files {
        match pool.read_owner(&f) {
            Ok(Some(r)) if r.owner == id.host_id && r.state == OwnerState::Active => {
                match pool.release(&f, &id.host_id) {
                    Ok(()) => {
                        if let Err(e) = pool.clear_ran(&f) {
                            warn!(pool_file = %f, error = %e, "could not delete the pool file's ran marker");
                        }
                        info!(pool_file = %f, "domain gone for good here: pool file deleted")
                    }
                    Err(e) => warn!(pool_file = %f, error = %e, "could not delete pool file"),
                }
            }
            Ok(Some(r)) => {
                info!(pool_file = %f, owner = %r.owner, state = %r.state, "pool file kept (not ours to delete)")
            }
            Ok(None) => {}
            Err(e) => warn!(pool_file = %f, error = %e, "unreadable owner record"),
        }
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
