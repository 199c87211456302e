//! Co-location, proven through the pool itself.
//!
//! Two cloud VMs are co-located for VMBeam exactly when they see the same pool. The source
//! writes a proof file (a random secret, named by a nonce) and a request addressed to the
//! destination's libvirt host UUID; the destination's vmbeamd, which watches its own view of
//! the pool, reads the proof and answers with its identity, the result, and an HMAC under
//! its cloud's key. A destination that does not share the pool never sees the request and
//! never answers; one in another virtual IaaS cloud answers with its cloud and a MAC the
//! source cannot verify. Metadata alone is a claim; this is the proof.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use vmbeam_core::plan::{DestinationReport, ProofStatus};
use vmbeam_core::pool;
use vmbeam_core::ticket::TicketKey;
use vmbeam_core::{CloudId, FileIdentity, HostId, Identity, Nonce, ProofToken};

const REQ_SUFFIX: &str = ".rdv-req";
const RESP_SUFFIX: &str = ".rdv-resp";

/// A request, written by the source into the pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub v: u32,
    pub nonce: Nonce,
    pub from_host: HostId,
    pub from_cloud: CloudId,
    /// The destination's libvirt host UUID (what the source's libvirt connection reports).
    pub to_libvirt_uuid: String,
    pub proof: ProofToken,
    /// The domain's pool file, whose identity the destination reports from its view.
    pub pool_file: Option<String>,
    pub expires_at: u64,
}

/// The destination's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub v: u32,
    pub nonce: Nonce,
    pub host_id: HostId,
    pub cloud: CloudId,
    pub libvirt_uuid: String,
    pub proof: ProofStatus,
    pub pool_identity: Option<FileIdentity>,
    /// HMAC-SHA256 under the answering cloud's key over the fields above.
    pub mac: String,
}

/// Why the rendezvous did not yield a usable report.
#[derive(Debug, thiserror::Error)]
pub enum RendezvousError {
    #[error("pool {0}: {1}")]
    Pool(PathBuf, String),
    #[error("no VMBeam daemon answered through the pool within {0:?}: the destination does not share this pool (or its vmbeamd is not running)")]
    NoAnswer(Duration),
    #[error("the destination's answer is not authenticated by this cloud's key (destination says it is in cloud '{0}')")]
    BadMac(String),
    #[error("malformed answer through the pool: {0}")]
    Malformed(String),
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn response_body(r: &Response) -> Vec<u8> {
    serde_json::json!([
        "vmbeam-rdv-1",
        r.nonce.to_hex(),
        r.host_id.as_str(),
        r.cloud.as_str(),
        r.libvirt_uuid,
        r.proof,
        r.pool_identity,
    ])
    .to_string()
    .into_bytes()
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("rdv")
    ));
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path)
}

/// Source side: asks the destination whose libvirt host UUID is `dest_libvirt_uuid` to
/// prove it sees this pool. `Ok(None)` never happens: no answer is an error naming why.
pub fn probe(
    identity: &Identity,
    key: &TicketKey,
    dest_libvirt_uuid: &str,
    pool_file: Option<&str>,
    timeout: Duration,
) -> Result<DestinationReport, RendezvousError> {
    let dir = &identity.pool_dir;
    let perr = |e: &dyn std::fmt::Display| RendezvousError::Pool(dir.clone(), e.to_string());
    let nonce = Nonce::random();
    let proof = pool::write_proof(dir, &nonce).map_err(|e| perr(&e))?;
    let req = Request {
        v: 1,
        nonce,
        from_host: identity.host_id.clone(),
        from_cloud: identity.cloud.clone(),
        to_libvirt_uuid: dest_libvirt_uuid.to_ascii_lowercase(),
        proof: proof.clone(),
        pool_file: pool_file.map(String::from),
        expires_at: now_secs() + timeout.as_secs() + 2,
    };
    let req_path = dir.join(format!("{nonce}{REQ_SUFFIX}"));
    let resp_path = dir.join(format!("{nonce}{RESP_SUFFIX}"));
    let cleanup = || {
        let _ = fs::remove_file(&req_path);
        let _ = fs::remove_file(&resp_path);
        let _ = pool::remove_proof(dir, &proof);
    };
    if let Err(e) = write_atomic(&req_path, &serde_json::to_vec(&req).expect("serializable")) {
        cleanup();
        return Err(perr(&e));
    }
    let deadline = Instant::now() + timeout;
    let answer = loop {
        match fs::read(&resp_path) {
            Ok(b) => break Some(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                cleanup();
                return Err(perr(&e));
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
    let resp: Response =
        serde_json::from_slice(&bytes).map_err(|e| RendezvousError::Malformed(e.to_string()))?;
    if resp.nonce != nonce {
        return Err(RendezvousError::Malformed(
            "answer for another request".into(),
        ));
    }
    if resp.cloud == identity.cloud {
        let mac = hex::decode(&resp.mac).unwrap_or_default();
        if !key.verify_signature(&response_body(&resp), &mac) {
            return Err(RendezvousError::BadMac(resp.cloud.to_string()));
        }
    }
    // A destination in another cloud cannot be authenticated with our key; its report
    // still says which cloud it is in, and the planner refuses zero-copy on that.
    Ok(DestinationReport {
        host_id: resp.host_id,
        cloud: resp.cloud,
        proof: if resp.libvirt_uuid.eq_ignore_ascii_case(dest_libvirt_uuid) {
            resp.proof
        } else {
            ProofStatus::Error(format!(
                "answered by libvirt host {} instead of {dest_libvirt_uuid}",
                resp.libvirt_uuid
            ))
        },
        pool_identity: resp.pool_identity,
    })
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
        let Some(name) = name.to_str() else { continue };
        let Some(nonce) = name.strip_suffix(REQ_SUFFIX) else {
            continue;
        };
        let resp_path = dir.join(format!("{nonce}{RESP_SUFFIX}"));
        if resp_path.exists() {
            continue;
        }
        let Ok(bytes) = fs::read(e.path()) else {
            continue;
        };
        let Ok(req) = serde_json::from_slice::<Request>(&bytes) else {
            continue;
        };
        if !req.to_libvirt_uuid.eq_ignore_ascii_case(my_libvirt_uuid) || req.expires_at < now_secs()
        {
            continue;
        }
        let proof = ProofStatus::from_read(&pool::read_proof(dir, &req.proof));
        let pool_identity = req
            .pool_file
            .as_deref()
            .filter(|f| pool::is_plain_file_name(f))
            .and_then(|f| pool::file_identity(&dir.join(f)).ok());
        let mut resp = Response {
            v: 1,
            nonce: req.nonce,
            host_id: identity.host_id.clone(),
            cloud: identity.cloud.clone(),
            libvirt_uuid: my_libvirt_uuid.to_ascii_lowercase(),
            proof,
            pool_identity,
            mac: String::new(),
        };
        resp.mac = hex::encode(key.sign(&response_body(&resp)));
        if write_atomic(
            &resp_path,
            &serde_json::to_vec(&resp).expect("serializable"),
        )
        .is_ok()
        {
            tracing::info!(from = %req.from_host, nonce = %req.nonce, proof = ?resp.proof, "answered a co-location request");
            answered += 1;
        }
    }
    answered
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
        assert!(matches!(e, RendezvousError::BadMac(_)), "{e}");
    }
}
