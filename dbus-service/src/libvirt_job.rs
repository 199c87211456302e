//! Running a migration as libvirt's own job and watching it: `migrateToURI3` on a blocking
//! thread, job statistics polled from a second connection, the completed statistics read
//! from the destination when it is done.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::libvirt_conn::Conn;
use virt::domain::{Domain, JobStats, MigrateParameters};
use virt::sys;

/// A libvirt call failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("cannot connect to {uri}: {msg}")]
    Connect { uri: String, msg: String },
    #[error("domain '{0}' not found")]
    NoDomain(String),
    #[error("domain '{0}' is not running")]
    NotRunning(String),
    #[error("migration failed: {0}")]
    Migration(String),
}

/// virsh-style migration flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags {
    pub live: bool,
    pub p2p: bool,
    pub persistent: bool,
    pub undefine_source: bool,
    /// QEMU native TLS for the migration stream (`VIR_MIGRATE_TLS`).
    pub tls: bool,
}

impl Flags {
    /// libvirt's `VIR_MIGRATE_*` bits.
    pub fn bits(&self) -> u32 {
        let mut f = 0;
        if self.live {
            f |= sys::VIR_MIGRATE_LIVE;
        }
        if self.p2p {
            f |= sys::VIR_MIGRATE_PEER2PEER;
        }
        if self.persistent {
            f |= sys::VIR_MIGRATE_PERSIST_DEST;
        }
        if self.undefine_source {
            f |= sys::VIR_MIGRATE_UNDEFINE_SOURCE;
        }
        if self.tls {
            f |= sys::VIR_MIGRATE_TLS;
        }
        f
    }
}

/// A snapshot of a running migration job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub processed: u64,
    pub total: u64,
    pub remaining: u64,
    pub elapsed_ms: u64,
}

/// The outcome of a completed migration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Completed {
    /// Bytes QEMU sent (all of the migration stream: RAM and device state).
    pub bytes_transferred: u64,
    /// RAM bytes QEMU sent.
    pub ram_bytes: u64,
    pub downtime_ms: Option<u64>,
    /// libvirt's job time.
    pub job_ms: Option<u64>,
    /// Wall time of the whole call.
    pub total_ms: u64,
    pub iterations: Option<u64>,
}

fn connect(uri: &str) -> Result<Conn, JobError> {
    Conn::open(uri).map_err(|e| JobError::Connect {
        uri: uri.into(),
        msg: e.to_string(),
    })
}

fn progress_of(s: &JobStats) -> Progress {
    Progress {
        processed: s.data_processed.or(s.mem_processed).unwrap_or(0),
        total: s.data_total.or(s.mem_total).unwrap_or(0),
        remaining: s.data_remaining.or(s.mem_remaining).unwrap_or(0),
        elapsed_ms: s.time_elapsed.unwrap_or(0),
    }
}

/// One migration, as libvirt's `migrateToURI3` takes it.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// The source's libvirt.
    pub src_uri: String,
    pub domain: String,
    /// The destination's libvirt (P2P: the source's libvirtd connects there).
    pub dest_uri: String,
    /// QEMU's data URI (`tcp://ADDR`), as in virsh; default: libvirt's choice.
    pub migrate_uri: Option<String>,
    pub flags: Flags,
    /// The domain XML the destination gets (`VIR_MIGRATE_PARAM_DEST_XML`).
    pub dest_xml: Option<String>,
    /// The persistent definition for the destination (`VIR_MIGRATE_PARAM_PERSIST_XML`).
    pub persist_xml: Option<String>,
    /// Suspend the guest after this long, as `virsh migrate --timeout` does.
    pub suspend_after: Option<Duration>,
}

/// `virDomainGetJobStats`, without `virt` 0.4's `Domain::get_job_stats` (0.5.0 is the same).
/// That wrapper hands libvirt's array to `Vec::from_raw_parts`: when no job runs (between
/// libvirt's phases, or just after the job ended) libvirt answers `VIR_DOMAIN_JOB_NONE` with
/// no parameters and a NULL array, which is undefined behaviour there (a debug build aborts
/// the whole daemon mid-migration; that was the "vmbeamd left the bus under load" crash),
/// and it frees the array with Rust's allocator instead of `virTypedParamsFree`.
fn job_stats(dom: &Domain, flags: u32) -> Result<JobStats, virt::error::Error> {
    let mut kind: std::ffi::c_int = 0;
    let mut params: sys::virTypedParameterPtr = std::ptr::null_mut();
    let mut nparams: std::ffi::c_int = 0;
    // SAFETY: `dom` is a valid domain handle for the call; the three out-pointers point to
    // live locals; libvirt allocates `params` (or leaves it NULL) and we free it below.
    let r = unsafe {
        sys::virDomainGetJobStats(dom.as_ptr(), &mut kind, &mut params, &mut nparams, flags)
    };
    if r < 0 {
        return Err(virt::error::Error::last_error());
    }
    // SAFETY: libvirt just returned these, and ownership passes to the callee.
    Ok(unsafe { take_job_stats(kind, params, nparams) })
}

/// Converts and frees a typed-parameter array that libvirt allocated (NULL and 0 allowed).
///
/// # Safety
/// `params` is NULL or points to `nparams` initialised parameters allocated by libvirt,
/// owned by the caller and not used after this call.
unsafe fn take_job_stats(
    kind: std::ffi::c_int,
    params: sys::virTypedParameterPtr,
    nparams: std::ffi::c_int,
) -> JobStats {
    if params.is_null() || nparams <= 0 {
        return JobStats {
            r#type: kind,
            ..Default::default()
        };
    }
    // SAFETY: per this function's contract there are `nparams` initialised parameters at
    // `params`; they are `Copy`, and the copy's string pointers stay valid until the free
    // below (virt's conversion copies strings without freeing them).
    let copy = unsafe { std::slice::from_raw_parts(params, nparams as usize) }.to_vec();
    let stats = JobStats::from((kind, copy));
    // SAFETY: `params`/`nparams` are exactly what libvirt allocated, freed once, here.
    unsafe { sys::virTypedParamsFree(params, nparams) };
    stats
}

/// Aborts the running job of `domain` (what `virsh domjobabort` does).
pub fn abort(src_uri: &str, domain: &str) -> Result<(), JobError> {
    let c = connect(src_uri)?;
    let d = Domain::lookup_by_name(&c, domain).map_err(|_| JobError::NoDomain(domain.into()))?;
    // SAFETY: `d` is a valid domain handle that outlives the call; virDomainAbortJob only
    // reads it and takes no ownership.
    let r = unsafe { sys::virDomainAbortJob(d.as_ptr()) };
    if r < 0 {
        return Err(JobError::Migration(
            virt::error::Error::last_error().message().to_string(),
        ));
    }
    Ok(())
}

/// Migrates `req.domain` (P2P when `req.flags.p2p`), reporting progress every `every`.
pub fn migrate(
    req: &Request,
    every: Duration,
    mut on_progress: impl FnMut(Progress),
) -> Result<Completed, JobError> {
    let start = Instant::now();
    let src = connect(&req.src_uri)?;
    let dom = Domain::lookup_by_name(&src, &req.domain)
        .map_err(|_| JobError::NoDomain(req.domain.clone()))?;
    if !dom.is_active().unwrap_or(false) {
        return Err(JobError::NotRunning(req.domain.clone()));
    }
    let (tx, rx) = mpsc::channel();
    let r2 = req.clone();
    let worker = std::thread::spawn(move || {
        let r = (|| {
            let c = connect(&r2.src_uri)?;
            let d = Domain::lookup_by_name(&c, &r2.domain)
                .map_err(|_| JobError::NoDomain(r2.domain.clone()))?;
            let params = MigrateParameters {
                uri: r2.migrate_uri.clone(),
                dest_xml: r2.dest_xml.clone(),
                persist_xml: r2.persist_xml.clone(),
                ..Default::default()
            };
            d.migrate_to_uri3(Some(&r2.dest_uri), params, r2.flags.bits())
                .map_err(|e| JobError::Migration(e.message().to_string()))
        })();
        let _ = tx.send(r);
    });
    let mut suspended = false;
    let result = loop {
        match rx.recv_timeout(every) {
            Ok(r) => break r,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Ok(s) = job_stats(&dom, 0) {
                    if s.r#type != sys::VIR_DOMAIN_JOB_NONE as i32 {
                        on_progress(progress_of(&s));
                    }
                }
                if let Some(after) = req.suspend_after {
                    if !suspended && start.elapsed() >= after {
                        suspended = dom.suspend().is_ok();
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break Err(JobError::Migration("worker thread died".into()))
            }
        }
    };
    let _ = worker.join();
    result?;
    let total_ms = start.elapsed().as_millis() as u64;
    // The destination keeps the completed job's statistics (the source sends its own in
    // the migration cookie), so read them there: the source domain may be gone.
    let mut done = Completed {
        total_ms,
        ..Default::default()
    };
    if let Ok(dc) = connect(&req.dest_uri) {
        if let Ok(d) = Domain::lookup_by_name(&dc, &req.domain) {
            if let Ok(s) = job_stats(&d, sys::VIR_DOMAIN_JOB_STATS_COMPLETED) {
                done.bytes_transferred = s.data_processed.or(s.mem_processed).unwrap_or(0);
                done.ram_bytes = s.mem_processed.unwrap_or(0);
                done.downtime_ms = s.downtime;
                done.job_ms = s.time_elapsed;
                done.iterations = s.mem_iteration;
            }
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What libvirt answers when no job runs (between its phases, or just after the job
    /// ended): no parameters and a NULL array, which virt's own wrapper turned into
    /// undefined behaviour (a debug build aborted the daemon).
    #[test]
    fn job_stats_without_parameters_is_a_plain_answer() {
        let none = sys::VIR_DOMAIN_JOB_NONE as i32;
        // SAFETY: NULL and 0 are allowed by the contract.
        let s = unsafe { take_job_stats(none, std::ptr::null_mut(), 0) };
        assert_eq!(s.r#type, none);
        assert_eq!(s.data_processed, None);
    }

    /// A libvirt-allocated array is read and freed with libvirt's own allocator.
    #[test]
    fn job_stats_reads_and_frees_libvirt_parameters() {
        // SAFETY: plain library initialisation (connecting does it implicitly); without it
        // libvirt's per-thread error state is torn down wrongly when the test thread exits.
        assert_eq!(unsafe { sys::virInitialize() }, 0);
        let mut params: sys::virTypedParameterPtr = std::ptr::null_mut();
        let (mut n, mut max) = (0, 0);
        for (name, v) in [(c"data_processed", 4096u64), (c"downtime", 17)] {
            // SAFETY: the out-pointers point to live locals; libvirt (re)allocates the array.
            let r = unsafe {
                sys::virTypedParamsAddULLong(&mut params, &mut n, &mut max, name.as_ptr(), v)
            };
            assert_eq!(r, 0);
        }
        let unbounded = sys::VIR_DOMAIN_JOB_UNBOUNDED as i32;
        // SAFETY: `params`/`n` came from libvirt and are not used afterwards.
        let s = unsafe { take_job_stats(unbounded, params, n) };
        assert_eq!(s.r#type, unbounded);
        assert_eq!(s.data_processed, Some(4096));
        assert_eq!(s.downtime, Some(17));
    }

    #[test]
    fn flags_map_to_libvirt_bits() {
        let f = Flags {
            live: true,
            p2p: true,
            persistent: true,
            undefine_source: true,
            tls: false,
        };
        // Nova's default live-migration flags: LIVE|PEER2PEER|PERSIST_DEST|UNDEFINE_SOURCE = 27.
        assert_eq!(f.bits(), 27);
        let tls = Flags { tls: true, ..f };
        assert_eq!(tls.bits(), 27 | 65536);
        assert_eq!(Flags::default().bits(), 0);
    }
}
