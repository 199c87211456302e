//! Co-location, proven through the pool itself: the rendezvous protocol's messages.
//!
//! Two cloud VMs are co-located for VMBeam exactly when they see the same pool. The source
//! writes a proof file (a random secret, named by a nonce; see [`crate::pool::write_proof`])
//! and a [`Request`] addressed to the destination's libvirt host UUID, named
//! [`request_file_name`]. The destination's vmbeamd, which watches its own view of the pool,
//! reads the proof and writes a [`Response`] ([`response_file_name`]): its identity, the
//! proof's result, the pool file's identity as it sees it, and an HMAC under its cloud's key.
//! A destination that does not share the pool never sees the request and never answers; one
//! in another virtual IaaS cloud answers with its cloud and a MAC the source cannot verify.
//! Metadata alone is a claim; this is the proof.
//!
//! This module is the protocol without the I/O: building, encoding, decoding, signing and
//! checking the messages. The daemon's loops (the source's wait for the answer, the
//! destination's scan of the pool) read and write the files.

use serde::{Deserialize, Serialize};

use crate::ids::{CloudId, FileIdentity, HostId, Nonce};
use crate::plan::{DestinationReport, ProofStatus};
use crate::pool::{ProofToken, RDV_REQ_SUFFIX, RDV_RESP_SUFFIX};
use crate::ticket::TicketKey;

/// The message format's version.
pub const VERSION: u32 = 1;
/// Context label at the head of the signed body (keeps these MACs apart from other uses of
/// the cloud's key).
const MAC_CONTEXT: &str = "vmbeam-rdv-1";

/// Why a rendezvous message was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// The bytes are not a message of this protocol.
    #[error("malformed {what} through the pool")]
    Malformed {
        /// "request" or "answer".
        what: &'static str,
        /// The decoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// The answer is for another request.
    #[error("answer for another request (nonce {found}, expected {expected})")]
    WrongNonce {
        /// The request's nonce.
        expected: Nonce,
        /// The answer's nonce.
        found: Nonce,
    },
    /// The answer claims this cloud but its MAC does not verify under this cloud's key.
    #[error("the destination's answer is not authenticated by this cloud's key (destination says it is in cloud '{cloud}')")]
    BadMac {
        /// The cloud the answer claims.
        cloud: CloudId,
    },
}

/// The request's file name in the pool: `<nonce>.rdv-req`.
pub fn request_file_name(nonce: &Nonce) -> String {
    format!("{nonce}{RDV_REQ_SUFFIX}")
}

/// The answer's file name in the pool: `<nonce>.rdv-resp`.
pub fn response_file_name(nonce: &Nonce) -> String {
    format!("{nonce}{RDV_RESP_SUFFIX}")
}

/// The nonce of a request file's name; `None` for any other name.
pub fn parse_request_file_name(name: &str) -> Option<Nonce> {
    name.strip_suffix(RDV_REQ_SUFFIX)?.parse().ok()
}

/// A request, written by the source into the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// [`VERSION`].
    pub v: u32,
    /// Names the request, the answer and the proof file.
    pub nonce: Nonce,
    /// The source cloud VM.
    pub from_host: HostId,
    /// The source's cloud.
    pub from_cloud: CloudId,
    /// The destination's libvirt host UUID (what the source's libvirt connection reports),
    /// lowercase.
    pub to_libvirt_uuid: String,
    /// The proof file the destination must find in its view of the pool.
    pub proof: ProofToken,
    /// The domain's pool file, whose identity the destination reports from its view.
    pub pool_file: Option<String>,
    /// Unix time after which the destination ignores the request.
    pub expires_at: u64,
}

impl Request {
    /// A request for the proof `proof` (whose nonce names the request), addressed to the
    /// libvirt host `to_libvirt_uuid`.
    pub fn new(
        from_host: HostId,
        from_cloud: CloudId,
        to_libvirt_uuid: &str,
        proof: ProofToken,
        pool_file: Option<&str>,
        expires_at: u64,
    ) -> Self {
        Request {
            v: VERSION,
            nonce: proof.nonce,
            from_host,
            from_cloud,
            to_libvirt_uuid: to_libvirt_uuid.to_ascii_lowercase(),
            proof,
            pool_file: pool_file.map(String::from),
            expires_at,
        }
    }

    /// The request's bytes (JSON).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a request serializes")
    }

    /// Reads a request's bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        serde_json::from_slice(bytes).map_err(|source| MessageError::Malformed {
            what: "request",
            source,
        })
    }

    /// True when the request is addressed to the libvirt host `libvirt_uuid` and has not
    /// expired at `now` (Unix seconds).
    pub fn is_for(&self, libvirt_uuid: &str, now: u64) -> bool {
        self.to_libvirt_uuid.eq_ignore_ascii_case(libvirt_uuid) && self.expires_at >= now
    }
}

/// The destination's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// [`VERSION`].
    pub v: u32,
    /// The request's nonce.
    pub nonce: Nonce,
    /// The answering cloud VM.
    pub host_id: HostId,
    /// Its cloud.
    pub cloud: CloudId,
    /// Its libvirt host UUID, lowercase.
    pub libvirt_uuid: String,
    /// What it found when it read the proof file in its view of the pool.
    pub proof: ProofStatus,
    /// The request's pool file as it sees it.
    pub pool_identity: Option<FileIdentity>,
    /// HMAC-SHA256 under the answering cloud's key over the fields above, hex.
    pub mac: String,
}

impl Response {
    /// The answer to `request` from the cloud VM `host_id` of `cloud` (libvirt host
    /// `libvirt_uuid`), signed with its cloud's `key`.
    pub fn answer(
        request: &Request,
        host_id: HostId,
        cloud: CloudId,
        libvirt_uuid: &str,
        proof: ProofStatus,
        pool_identity: Option<FileIdentity>,
        key: &TicketKey,
    ) -> Self {
        let mut r = Response {
            v: VERSION,
            nonce: request.nonce,
            host_id,
            cloud,
            libvirt_uuid: libvirt_uuid.to_ascii_lowercase(),
            proof,
            pool_identity,
            mac: String::new(),
        };
        r.mac = hex::encode(key.sign(&r.body()));
        r
    }

    /// What the MAC covers: a JSON array of the context label and the fields, in a fixed
    /// order.
    fn body(&self) -> Vec<u8> {
        serde_json::json!([
            MAC_CONTEXT,
            self.nonce.to_hex(),
            self.host_id.as_str(),
            self.cloud.as_str(),
            self.libvirt_uuid,
            self.proof,
            self.pool_identity,
        ])
        .to_string()
        .into_bytes()
    }

    /// True when the MAC verifies under `key` (constant time).
    pub fn is_signed_by(&self, key: &TicketKey) -> bool {
        let mac = hex::decode(&self.mac).unwrap_or_default();
        key.verify_signature(&self.body(), &mac)
    }

    /// The answer's bytes (JSON).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an answer serializes")
    }

    /// Reads an answer's bytes (nothing checked but the shape).
    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        serde_json::from_slice(bytes).map_err(|source| MessageError::Malformed {
            what: "answer",
            source,
        })
    }
}

/// Source side: checks the answer `bytes` to the request `nonce` that the source (of cloud
/// `local_cloud`, holding that cloud's `key`) addressed to the libvirt host
/// `dest_libvirt_uuid`, and turns it into the planner's [`DestinationReport`].
///
/// An answer claiming the source's cloud must carry a MAC under its key. An answer from
/// another cloud cannot be authenticated with our key; its report still says which cloud
/// it is in, and the planner refuses zero-copy on that. An answer from another libvirt host
/// than the one asked reports the proof as an error.
pub fn read_answer(
    bytes: &[u8],
    key: &TicketKey,
    nonce: &Nonce,
    local_cloud: &CloudId,
    dest_libvirt_uuid: &str,
) -> Result<DestinationReport, MessageError> {
    let resp = Response::decode(bytes)?;
    if resp.nonce != *nonce {
        return Err(MessageError::WrongNonce {
            expected: *nonce,
            found: resp.nonce,
        });
    }
    if resp.cloud == *local_cloud && !resp.is_signed_by(key) {
        return Err(MessageError::BadMac { cloud: resp.cloud });
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const DEST_UUID: &str = "5f0c2b5e-0000-4000-8000-00000000000b";

    fn key(b: u8) -> TicketKey {
        TicketKey::from_bytes(vec![b; 32]).unwrap()
    }
    fn host(s: &str) -> HostId {
        HostId::new(s).unwrap()
    }
    fn cloud(s: &str) -> CloudId {
        CloudId::new(s).unwrap()
    }

    fn request() -> Request {
        let proof = ProofToken {
            nonce: Nonce([3; 16]),
            sha256: "00".repeat(32),
            identity: FileIdentity { dev: 1, ino: 2 },
        };
        Request::new(
            host("cvm1"),
            cloud("acme"),
            &DEST_UUID.to_ascii_uppercase(),
            proof,
            Some("x.1.ram"),
            1000,
        )
    }

    fn answer_from(req: &Request, cloud_id: &str, uuid: &str, k: &TicketKey) -> Vec<u8> {
        Response::answer(
            req,
            host("cvm2"),
            cloud(cloud_id),
            uuid,
            ProofStatus::Proven,
            Some(FileIdentity { dev: 1, ino: 9 }),
            k,
        )
        .encode()
    }

    #[test]
    fn file_names() {
        let n = Nonce([0xab; 16]);
        let req = request_file_name(&n);
        assert_eq!(req, format!("{}.rdv-req", "ab".repeat(16)));
        assert_eq!(
            response_file_name(&n),
            format!("{}.rdv-resp", "ab".repeat(16))
        );
        assert_eq!(parse_request_file_name(&req), Some(n));
        for other in [
            response_file_name(&n),
            "x.rdv-req".to_string(),
            format!("{n}.proof"),
            ".rdv-req".to_string(),
        ] {
            assert_eq!(parse_request_file_name(&other), None, "{other}");
        }
    }

    #[test]
    fn request_round_trip_and_addressing() {
        let req = request();
        assert_eq!(req.nonce, req.proof.nonce);
        assert_eq!(req.to_libvirt_uuid, DEST_UUID, "stored lowercase");
        let back = Request::decode(&req.encode()).unwrap();
        assert_eq!(back, req);
        assert!(back.is_for(&DEST_UUID.to_ascii_uppercase(), 1000));
        assert!(!back.is_for(DEST_UUID, 1001), "expired");
        assert!(!back.is_for("5f0c2b5e-0000-4000-8000-00000000000c", 10));
    }

    #[test]
    fn answer_round_trip() {
        let req = request();
        let bytes = answer_from(&req, "acme", &DEST_UUID.to_ascii_uppercase(), &key(7));
        let r = read_answer(&bytes, &key(7), &req.nonce, &cloud("acme"), DEST_UUID).unwrap();
        assert_eq!(r.host_id, host("cvm2"));
        assert_eq!(r.cloud, cloud("acme"));
        assert_eq!(r.proof, ProofStatus::Proven);
        assert_eq!(r.pool_identity, Some(FileIdentity { dev: 1, ino: 9 }));
    }

    #[test]
    fn an_answer_under_another_key_is_refused() {
        let req = request();
        let bytes = answer_from(&req, "acme", DEST_UUID, &key(9));
        let e = read_answer(&bytes, &key(7), &req.nonce, &cloud("acme"), DEST_UUID).unwrap_err();
        assert!(matches!(e, MessageError::BadMac { .. }), "{e}");
        // An altered answer (the MAC no longer covers it) is refused too.
        let mut resp = Response::decode(&answer_from(&req, "acme", DEST_UUID, &key(7))).unwrap();
        resp.proof = ProofStatus::Proven;
        resp.host_id = host("cvm3");
        let e = read_answer(
            &resp.encode(),
            &key(7),
            &req.nonce,
            &cloud("acme"),
            DEST_UUID,
        )
        .unwrap_err();
        assert!(matches!(e, MessageError::BadMac { .. }), "{e}");
        // And one without a usable MAC.
        resp.mac = "not hex".into();
        assert!(matches!(
            read_answer(
                &resp.encode(),
                &key(7),
                &req.nonce,
                &cloud("acme"),
                DEST_UUID
            ),
            Err(MessageError::BadMac { .. })
        ));
    }

    #[test]
    fn another_clouds_answer_is_reported_unauthenticated() {
        // The planner refuses zero-copy on the cloud; the MAC cannot be checked.
        let req = request();
        let bytes = answer_from(&req, "other", DEST_UUID, &key(9));
        let r = read_answer(&bytes, &key(7), &req.nonce, &cloud("acme"), DEST_UUID).unwrap();
        assert_eq!(r.cloud, cloud("other"));
    }

    #[test]
    fn an_answer_to_another_request_is_refused() {
        let req = request();
        let bytes = answer_from(&req, "acme", DEST_UUID, &key(7));
        let e =
            read_answer(&bytes, &key(7), &Nonce([4; 16]), &cloud("acme"), DEST_UUID).unwrap_err();
        assert!(matches!(e, MessageError::WrongNonce { .. }), "{e}");
    }

    #[test]
    fn an_answer_from_another_libvirt_host_is_no_proof() {
        let req = request();
        let other = "5f0c2b5e-0000-4000-8000-00000000000c";
        let bytes = answer_from(&req, "acme", other, &key(7));
        let r = read_answer(&bytes, &key(7), &req.nonce, &cloud("acme"), DEST_UUID).unwrap();
        assert!(
            matches!(r.proof, ProofStatus::Error(ref m) if m.contains(other)),
            "{:?}",
            r.proof
        );
    }

    #[test]
    fn truncated_or_garbage_input_is_malformed() {
        let req = request();
        let bytes = answer_from(&req, "acme", DEST_UUID, &key(7));
        for bad in [
            &bytes[..bytes.len() / 2],
            b"".as_slice(),
            b"\xff\xfe garbage",
            b"{}",
            b"[1,2,3]",
        ] {
            let e = read_answer(bad, &key(7), &req.nonce, &cloud("acme"), DEST_UUID).unwrap_err();
            assert!(
                matches!(e, MessageError::Malformed { what: "answer", .. }),
                "{e}"
            );
        }
        let enc = req.encode();
        for bad in [&enc[..enc.len() - 1], b"null".as_slice()] {
            assert!(matches!(
                Request::decode(bad),
                Err(MessageError::Malformed {
                    what: "request",
                    ..
                })
            ));
        }
        // An answer whose host id is not a valid identifier is malformed, not trusted.
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v["host_id"] = "../etc".into();
        let e = read_answer(
            v.to_string().as_bytes(),
            &key(7),
            &req.nonce,
            &cloud("acme"),
            DEST_UUID,
        )
        .unwrap_err();
        assert!(matches!(e, MessageError::Malformed { .. }), "{e}");
    }

    #[test]
    fn the_signed_body_is_stable() {
        // The MAC covers this exact encoding; a change breaks mixed-version clouds.
        let req = request();
        let resp = Response::answer(
            &req,
            host("cvm2"),
            cloud("acme"),
            DEST_UUID,
            ProofStatus::Proven,
            Some(FileIdentity { dev: 1, ino: 9 }),
            &key(7),
        );
        assert_eq!(
            String::from_utf8(resp.body()).unwrap(),
            format!(
                r#"["vmbeam-rdv-1","{}","cvm2","acme","{DEST_UUID}","proven",{{"dev":1,"ino":9}}]"#,
                "03".repeat(16)
            )
        );
    }
}

#[cfg(test)]
mod prop_tests {
    use proptest::prelude::*;

    use super::*;
    use crate::proptest_support::{mutate, proptest_config};

    fn key() -> TicketKey {
        TicketKey::from_bytes(vec![5u8; 32]).unwrap()
    }

    fn proof_status() -> impl Strategy<Value = ProofStatus> {
        prop_oneof![
            Just(ProofStatus::Proven),
            Just(ProofStatus::NotAttempted),
            Just(ProofStatus::Unreadable),
            Just(ProofStatus::ContentMismatch),
            Just(ProofStatus::IdentityMismatch),
            ".{0,20}".prop_map(ProofStatus::Error),
        ]
    }

    prop_compose! {
        fn request()(
            nonce in any::<[u8; 16]>(),
            sha in "[0-9a-f]{64}",
            dev in any::<u64>(),
            ino in any::<u64>(),
            to in ".{0,40}",
            pool_file in proptest::option::of(".{0,40}"),
            expires_at in any::<u64>(),
        ) -> Request {
            let proof = ProofToken {
                nonce: Nonce(nonce),
                sha256: sha,
                identity: FileIdentity { dev, ino },
            };
            Request::new(
                HostId::new("cvm1").unwrap(),
                CloudId::new("acme").unwrap(),
                &to,
                proof,
                pool_file.as_deref(),
                expires_at,
            )
        }
    }

    prop_compose! {
        fn response()(
            req in request(),
            uuid in ".{0,40}",
            proof in proof_status(),
            identity in proptest::option::of(any::<(u64, u64)>()),
        ) -> Response {
            Response::answer(
                &req,
                HostId::new("cvm2").unwrap(),
                CloudId::new("acme").unwrap(),
                &uuid,
                proof,
                identity.map(|(dev, ino)| FileIdentity { dev, ino }),
                &key(),
            )
        }
    }

    proptest! {
        #![proptest_config(proptest_config())]

        #[test]
        fn prop_rdv_decode_arbitrary_bytes_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..400),
        ) {
            let _ = Request::decode(&bytes);
            let _ = Response::decode(&bytes);
            let n = Nonce([0; 16]);
            let _ = read_answer(&bytes, &key(), &n, &CloudId::new("acme").unwrap(), "x");
        }

        #[test]
        fn prop_rdv_request_file_name_round_trip(nonce in any::<[u8; 16]>(), other in ".{0,80}") {
            let n = Nonce(nonce);
            prop_assert_eq!(parse_request_file_name(&request_file_name(&n)), Some(n));
            prop_assert_eq!(parse_request_file_name(&response_file_name(&n)), None);
            if let Some(parsed) = parse_request_file_name(&other) {
                prop_assert!(!other.contains('/'));
                prop_assert_eq!(
                    request_file_name(&parsed).to_ascii_lowercase(),
                    other.to_ascii_lowercase()
                );
            }
        }

        #[test]
        fn prop_rdv_request_round_trip(req in request()) {
            prop_assert_eq!(Request::decode(&req.encode()).unwrap(), req);
        }

        #[test]
        fn prop_rdv_response_round_trip_and_signed(resp in response()) {
            let back = Response::decode(&resp.encode()).unwrap();
            prop_assert!(back.is_signed_by(&key()));
            prop_assert!(!back.is_signed_by(&TicketKey::from_bytes(vec![6u8; 32]).unwrap()));
            prop_assert_eq!(back, resp);
        }

        #[test]
        fn prop_rdv_mutated_request_never_panics(
            req in request(),
            mode in any::<u8>(),
            pos in any::<prop::sample::Index>(),
            b in any::<u8>(),
        ) {
            let bytes = mutate(req.encode(), mode, pos, b);
            if let Ok(parsed) = Request::decode(&bytes) {
                prop_assert_eq!(Request::decode(&parsed.encode()).unwrap(), parsed);
            }
        }

        #[test]
        fn prop_rdv_mutated_response_verifies_only_unchanged_content(
            resp in response(),
            mode in any::<u8>(),
            pos in any::<prop::sample::Index>(),
            b in any::<u8>(),
        ) {
            let bytes = mutate(resp.encode(), mode, pos, b);
            let acme = CloudId::new("acme").unwrap();
            let got = read_answer(&bytes, &key(), &resp.nonce, &acme, &resp.libvirt_uuid);
            if let Ok(parsed) = Response::decode(&bytes) {
                if parsed.is_signed_by(&key()) {
                    // Only an edit that leaves every signed field as it was may still verify
                    // (JSON whitespace, hex case of the MAC).
                    prop_assert_eq!(parsed.body(), resp.body());
                    prop_assert!(got.is_ok());
                } else if parsed.cloud == acme && parsed.nonce == resp.nonce {
                    prop_assert!(
                        matches!(got, Err(MessageError::BadMac { .. })),
                        "{:?}",
                        got
                    );
                }
            } else {
                prop_assert!(got.is_err());
            }
        }
    }
}
