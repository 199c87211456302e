//! Co-location, proven through the pool itself: the rendezvous's I/O. The protocol (the
//! messages, their MAC and their file names) is `vmbeam_core::rendezvous`; here are the
//! source's wait for an answer ([`probe`]) and the destination's scan of its view of the
//! pool ([`serve_once`], run every [`SERVE_INTERVAL`] by [`serve_forever`]).

use std::error::Error as _;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmbeam_core::plan::{DestinationReport, ProofStatus};
use vmbeam_core::pool::{self, PoolError};
use vmbeam_core::rendezvous::{self as rdv, MessageError, Request, Response};
use vmbeam_core::ticket::TicketKey;
use vmbeam_core::{Identity, Nonce};

use crate::state::{now_secs, SharedCtx};

/// How often the destination scans the pool for requests.
pub const SERVE_INTERVAL: Duration = Duration::from_millis(20);

/// Why the rendezvous did not yield a usable report.
#[derive(Debug, thiserror::Error)]
pub enum RendezvousError {
    #[error("pool {}: cannot write the proof", .0.display())]
    Proof(PathBuf, #[source] PoolError),
    #[error("pool: cannot {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pool: cannot read {}", .0.display())]
    Read(PathBuf, #[source] PoolError),
    #[error("no VMBeam daemon answered through the pool within {0:?}: the destination does not share this pool (or its vmbeamd is not running)")]
    NoAnswer(Duration),
    #[error(transparent)]
    Answer(#[from] MessageError),
}

impl RendezvousError {
    /// The message with its causes, on one line (`a: b: c`).
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        // (`Answer` is transparent: its Display and source are its inner error's.)
        let mut cur = self.source();
        while let Some(e) = cur {
            out.push_str(": ");
            out.push_str(&e.to_string());
            cur = e.source();
        }
        out
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    // The pool is shared with other cloud VMs: a fixed temporary name (`.<nonce>.rdv-resp.tmp`,
    // guessable once the request is visible) could be planted beforehand as a symlink to any
    // file, which `fs::write` would follow and truncate. The temporary file gets a random name
    // and is created new (`create_new` never follows a symlink), mode 0600 like every file
    // VMBeam leaves in the pool.
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("rdv"),
        Nonce::random()
    ));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    let written = file.write_all(bytes).and_then(|()| fs::rename(&tmp, path));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Source side: asks the destination whose libvirt host UUID is `dest_libvirt_uuid` to
/// prove it sees this pool. No answer is an error naming why.
pub fn probe(
    identity: &Identity,
    key: &TicketKey,
    dest_libvirt_uuid: &str,
    pool_file: Option<&str>,
    timeout: Duration,
) -> Result<DestinationReport, RendezvousError> {
    let dir = &identity.pool_dir;
    let nonce = Nonce::random();
    let proof =
        pool::write_proof(dir, &nonce).map_err(|e| RendezvousError::Proof(dir.clone(), e))?;
    let req = Request::new(
        identity.host_id.clone(),
        identity.cloud.clone(),
        dest_libvirt_uuid,
        proof.clone(),
        pool_file,
        now_secs() + timeout.as_secs() + 2,
    );
    let req_path = dir.join(rdv::request_file_name(&nonce));
    let resp_path = dir.join(rdv::response_file_name(&nonce));
    let cleanup = || {
        let _ = fs::remove_file(&req_path);
        let _ = fs::remove_file(&resp_path);
        let _ = pool::remove_proof(dir, &proof);
    };
    let io = |op, path: &Path| {
        let path = path.to_path_buf();
        move |source| RendezvousError::Io { op, path, source }
    };
    if let Err(e) = write_atomic(&req_path, &req.encode()) {
        cleanup();
        return Err(io("write", &req_path)(e));
    }
    let deadline = Instant::now() + timeout;
    let answer = loop {
        // Not `fs::read`: another cloud VM sharing the pool could leave a FIFO at the answer's
        // name (the read would block for good) or a symlink to an endless file.
        match pool::read_message(&resp_path) {
            Ok(b) => break Some(b),
            Err(PoolError::Missing(_)) => {}
            Err(e) => {
                cleanup();
                return Err(RendezvousError::Read(resp_path.clone(), e));
            }
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    cleanup();
    let Some(bytes) = answer else {
        return Err(RendezvousError::NoAnswer(timeout));
    };
    Ok(rdv::read_answer(
        &bytes,
        key,
        &nonce,
        &identity.cloud,
        dest_libvirt_uuid,
    )?)
}

/// Destination side: answers every pending request addressed to this host's libvirt.
/// Returns how many it answered. Cheap when there is nothing to do (one directory scan).
pub fn serve_once(identity: &Identity, key: &TicketKey, my_libvirt_uuid: &str) -> usize {
    let dir = &identity.pool_dir;
    let Ok(rd) = fs::read_dir(dir) else {
        return 0;
    };
    let mut answered = 0;
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(nonce) = name.to_str().and_then(rdv::parse_request_file_name) else {
            continue;
        };
        let resp_path = dir.join(rdv::response_file_name(&nonce));
        if resp_path.exists() {
            continue;
        }
        // (Bounded, regular files only, never blocking: see `probe`.)
        let Ok(bytes) = pool::read_message(&e.path()) else {
            continue;
        };
        let Ok(req) = Request::decode(&bytes) else {
            continue;
        };
        if req.nonce != nonce || !req.is_for(my_libvirt_uuid, now_secs()) {
            continue;
        }
        let proof = ProofStatus::from_read(&pool::read_proof(dir, &req.proof));
        let pool_identity = req
            .pool_file
            .as_deref()
            .filter(|f| pool::is_plain_file_name(f))
            .and_then(|f| pool::file_identity(&dir.join(f)).ok());
        let resp = Response::answer(
            &req,
            identity.host_id.clone(),
            identity.cloud.clone(),
            my_libvirt_uuid,
            proof,
            pool_identity,
            key,
        );
        if write_atomic(&resp_path, &resp.encode()).is_ok() {
            tracing::info!(from = %req.from_host, nonce = %req.nonce, proof = ?resp.proof, "answered a co-location request");
            answered += 1;
        }
    }
    answered
}

/// Destination side, for the daemon's lifetime: answers co-location requests addressed to
/// this host every [`SERVE_INTERVAL`], each scan on a blocking thread.
pub async fn serve_forever(ctx: SharedCtx) {
    let mut tick = tokio::time::interval(SERVE_INTERVAL);
    loop {
        tick.tick().await;
        let c = ctx.clone();
        let _ = tokio::task::spawn_blocking(move || {
            serve_once(&c.cfg.identity, &c.key, &c.libvirt_uuid)
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(dir: &Path, host: &str, cloud: &str) -> Identity {
        format!(
            "host_id = \"{host}\"\ncloud = \"{cloud}\"\npool_dir = \"{}\"\nkey_file = \"/nonexistent\"\n",
            dir.display()
        )
        .parse()
        .unwrap()
    }

    #[test]
    fn co_located_destination_proves_and_is_authenticated() {
        let pool = tempfile::tempdir().unwrap();
        let key = TicketKey::from_bytes(vec![7; 32]).unwrap();
        let src = ident(pool.path(), "cvm1", "acme");
        let dst = ident(pool.path(), "cvm2", "acme");
        let k2 = key.clone();
        let t = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && serve_once(&dst, &k2, "UUID-B") == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let r = probe(&src, &key, "uuid-b", None, Duration::from_secs(5)).unwrap();
        t.join().unwrap();
        assert_eq!(r.host_id.as_str(), "cvm2");
        assert_eq!(r.proof, ProofStatus::Proven);
        // Nothing left in the pool.
        assert_eq!(fs::read_dir(pool.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_destination_with_another_pool_never_answers() {
        let pool_a = tempfile::tempdir().unwrap();
        let pool_b = tempfile::tempdir().unwrap();
        let key = TicketKey::from_bytes(vec![7; 32]).unwrap();
        let src = ident(pool_a.path(), "cvm1", "acme");
        let dst = ident(pool_b.path(), "cvm2", "acme");
        assert_eq!(serve_once(&dst, &key, "uuid-b"), 0);
        let e = probe(&src, &key, "uuid-b", None, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, RendezvousError::NoAnswer(_)), "{e}");
    }

    #[test]
    fn a_forged_answer_is_rejected() {
        let pool = tempfile::tempdir().unwrap();
        let key = TicketKey::from_bytes(vec![7; 32]).unwrap();
        let other_key = TicketKey::from_bytes(vec![9; 32]).unwrap();
        let src = ident(pool.path(), "cvm1", "acme");
        let dst = ident(pool.path(), "cvm2", "acme");
        let t = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && serve_once(&dst, &other_key, "uuid-b") == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let e = probe(&src, &key, "uuid-b", None, Duration::from_secs(5)).unwrap_err();
        t.join().unwrap();
        assert!(
            matches!(e, RendezvousError::Answer(MessageError::BadMac { .. })),
            "{e}"
        );
    }
}

#[cfg(test)]
mod hostile_tests {
    //! The pool is shared with other cloud VMs: whatever they leave at the rendezvous' names
    //! must not make either side write outside the pool, block, or leave its files readable
    //! by others.

    use std::os::unix::fs::symlink;

    use super::*;
    use crate::hostile_support::{assert_private_file, mkfifo, names, within, Outside};
    use vmbeam_core::{CloudId, HostId};

    fn ident(dir: &Path, host: &str) -> Identity {
        format!(
            "host_id = \"{host}\"\ncloud = \"acme\"\npool_dir = \"{}\"\nkey_file = \"/nonexistent\"\n",
            dir.display()
        )
        .parse()
        .unwrap()
    }

    fn key() -> TicketKey {
        TicketKey::from_bytes(vec![7; 32]).unwrap()
    }

    /// A request addressed to `uuid-b`, written into `dir` as the source writes it.
    fn request_in(dir: &Path) -> (Nonce, PathBuf) {
        let nonce = Nonce::random();
        let proof = pool::write_proof(dir, &nonce).unwrap();
        let req = Request::new(
            HostId::new("cvm1").unwrap(),
            CloudId::new("acme").unwrap(),
            "uuid-b",
            proof,
            None,
            now_secs() + 60,
        );
        let path = dir.join(rdv::request_file_name(&nonce));
        write_atomic(&path, &req.encode()).unwrap();
        (nonce, path)
    }

    /// Regression: the request and the answer were written with `fs::write` to a fixed
    /// temporary name, `.<name>.tmp`. Another cloud VM that sees a request in the pool could
    /// plant a symlink at `.<nonce>.rdv-resp.tmp`, and the destination's vmbeamd (root)
    /// truncated and wrote the file it points at. Both were also left mode 0644.
    #[test]
    fn messages_are_written_private_and_never_through_a_planted_link() {
        let pool = tempfile::tempdir().unwrap();
        let outside = Outside::new(b"root's file\n");
        let (nonce, req_path) = request_in(pool.path());
        assert_private_file(&req_path);
        let planted = pool
            .path()
            .join(format!(".{}.tmp", rdv::response_file_name(&nonce)));
        symlink(&outside.file, &planted).unwrap();

        assert_eq!(serve_once(&ident(pool.path(), "cvm2"), &key(), "uuid-b"), 1);
        outside.assert_untouched();
        let resp_path = pool.path().join(rdv::response_file_name(&nonce));
        assert_private_file(&resp_path);
        let report = rdv::read_answer(
            &fs::read(&resp_path).unwrap(),
            &key(),
            &nonce,
            &CloudId::new("acme").unwrap(),
            "uuid-b",
        )
        .unwrap();
        assert_eq!(report.proof, ProofStatus::Proven);
        // The planted link is left as it was; no temporary file of ours is left beside it.
        let mut expected = vec![
            format!("{nonce}.proof"),
            rdv::request_file_name(&nonce),
            rdv::response_file_name(&nonce),
            planted.file_name().unwrap().to_str().unwrap().to_owned(),
        ];
        expected.sort();
        assert_eq!(names(pool.path()), expected);
        assert!(fs::symlink_metadata(&planted)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    /// Regression: the destination read requests with `fs::read`: a FIFO left at a request's
    /// name blocked its scan of the pool for good (no co-location request was ever answered
    /// again), and a symlink was followed to whatever it points at, read whole.
    #[test]
    fn a_request_that_is_no_regular_file_is_skipped_without_blocking() {
        let pool = tempfile::tempdir().unwrap();
        let dst = ident(pool.path(), "cvm2");
        // A valid request addressed to this host, kept outside the pool.
        let (nonce, req_path) = request_in(pool.path());
        let outside = Outside::new(&fs::read(&req_path).unwrap());
        fs::remove_file(&req_path).unwrap();

        symlink(&outside.file, &req_path).unwrap();
        let d = dst.clone();
        assert_eq!(
            within("symlink", move || serve_once(&d, &key(), "uuid-b")),
            0
        );
        fs::remove_file(&req_path).unwrap();
        mkfifo(&req_path);
        let d = dst.clone();
        assert_eq!(within("FIFO", move || serve_once(&d, &key(), "uuid-b")), 0);
        fs::remove_file(&req_path).unwrap();
        // Over the cap: the valid request padded with blanks.
        let mut padded = outside.content.clone();
        padded.resize(pool::MAX_MESSAGE_LEN as usize + 1, b' ');
        fs::write(&req_path, &padded).unwrap();
        let d = dst.clone();
        assert_eq!(within("long", move || serve_once(&d, &key(), "uuid-b")), 0);
        assert!(!pool.path().join(rdv::response_file_name(&nonce)).exists());
        outside.assert_untouched();
        // The same request as a plain file is answered.
        fs::write(&req_path, &outside.content).unwrap();
        assert_eq!(serve_once(&dst, &key(), "uuid-b"), 1);
    }

    /// Regression: the source read the answer with `fs::read`: a FIFO left at the answer's
    /// name blocked the migration's probe for good (its timeout was never reached), and a
    /// symlink was followed.
    #[test]
    fn an_answer_that_is_no_regular_file_fails_the_probe_at_once() {
        for fifo in [true, false] {
            let pool = tempfile::tempdir().unwrap();
            let outside = Outside::new(b"not an answer");
            let dir = pool.path().to_path_buf();
            let target = outside.file.clone();
            // Another cloud VM that sees the request plants something at the answer's name.
            let planter = std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline {
                    let nonce = names(&dir)
                        .iter()
                        .find_map(|n| rdv::parse_request_file_name(n));
                    if let Some(nonce) = nonce {
                        let at = dir.join(rdv::response_file_name(&nonce));
                        if fifo {
                            mkfifo(&at);
                        } else {
                            symlink(&target, &at).unwrap();
                        }
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                panic!("no request seen");
            });
            let src = ident(pool.path(), "cvm1");
            let r = within(&format!("probe (FIFO: {fifo})"), move || {
                probe(&src, &key(), "uuid-b", None, Duration::from_secs(5))
            });
            planter.join().unwrap();
            assert!(
                matches!(r, Err(RendezvousError::Read(_, PoolError::NotRegular(_)))),
                "{r:?}"
            );
            // The source cleaned up after itself (the planted name included).
            assert!(names(pool.path()).is_empty(), "{:?}", names(pool.path()));
            outside.assert_untouched();
        }
    }

    /// What the source leaves in the pool while it waits (the proof, the request) is 0600.
    #[test]
    fn the_sources_files_are_private_while_it_waits() {
        let pool = tempfile::tempdir().unwrap();
        let dir = pool.path().to_path_buf();
        let dst = ident(&dir, "cvm2");
        let t = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                let mine: Vec<String> = names(&dir)
                    .into_iter()
                    .filter(|n| n.ends_with(".rdv-req") || n.ends_with(".proof"))
                    .collect();
                if mine.len() == 2 {
                    for n in &mine {
                        assert_private_file(&dir.join(n));
                    }
                    assert_eq!(serve_once(&dst, &key(), "uuid-b"), 1);
                    return mine;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            panic!("no request seen");
        });
        let src = ident(pool.path(), "cvm1");
        let r = probe(&src, &key(), "uuid-b", None, Duration::from_secs(5)).unwrap();
        assert_eq!(r.proof, ProofStatus::Proven);
        assert_eq!(t.join().unwrap().len(), 2);
    }
}
