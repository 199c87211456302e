//! The content proof through a shared device's control page (the last 4 KiB of an
//! `ivshmem-plain` BAR, [`crate::host_protocol::control_page_offset`]): the host-device
//! pool's confirmation of co-location, the counterpart of the directory pool's proof file
//! ([`crate::pool::write_proof`]).
//!
//! The host's `COLOCATED` answer says two cloud VMs run on one host; it does not show that
//! the device the destination got is the very memory the source runs the guest on. So the
//! source writes a [`ControlProof`]'s record (magic, nonce, 32 random bytes) at the start of
//! the control page through its own mapping, and sends the destination only the nonce and
//! the SHA-256 of the record ([`ControlProof::token`], e.g. in the migration's ticket). The
//! destination reads the page through *its* mapping of the device and checks it
//! ([`ControlToken::check`]): only the same bytes match. Pure: the mapping is vmbeamd's.

use std::fmt;
use std::str::FromStr;

use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::ids::Nonce;

/// The record's first bytes.
pub const PROOF_MAGIC: &[u8; 8] = b"VMBEAMC1";
/// The record's length: magic, nonce, secret.
pub const PROOF_LEN: usize = 8 + 16 + 32;

/// A proof the source writes (kept by the source; only its [`ControlToken`] travels).
#[derive(Clone, PartialEq, Eq)]
pub struct ControlProof {
    record: [u8; PROOF_LEN],
}

impl fmt::Debug for ControlProof {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secret stays out of logs.
        f.debug_struct("ControlProof")
            .field("token", &self.token())
            .finish()
    }
}

impl ControlProof {
    /// A fresh proof: a random nonce and 32 random bytes.
    pub fn fresh() -> Self {
        let mut record = [0u8; PROOF_LEN];
        record[..8].copy_from_slice(PROOF_MAGIC);
        record[8..24].copy_from_slice(&Nonce::random().0);
        rand::rngs::OsRng.fill_bytes(&mut record[24..]);
        Self { record }
    }

    /// The bytes to write at the start of the control page.
    pub fn record(&self) -> &[u8; PROOF_LEN] {
        &self.record
    }

    /// What the destination is told.
    pub fn token(&self) -> ControlToken {
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(&self.record[8..24]);
        ControlToken {
            nonce: Nonce(nonce),
            sha256: Sha256::digest(self.record).into(),
        }
    }
}

/// What the destination checks its view of the control page against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlToken {
    /// The proof's nonce (also in the record: tells a stale record from a wrong device).
    pub nonce: Nonce,
    /// SHA-256 of the whole record.
    pub sha256: [u8; 32],
}

/// Why the destination's view of the control page does not prove the shared device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofMismatch {
    /// The page holds no proof record (a device that is not the source's, or zeroes).
    #[error("the control page holds no proof record (not the source's device?)")]
    NoRecord,
    /// The page holds another proof (an older one, or another source's).
    #[error("the control page holds another proof (nonce {found}, expected {expected})")]
    OtherNonce {
        /// The nonce found.
        found: Nonce,
        /// The nonce expected.
        expected: Nonce,
    },
    /// The nonce matches but the secret does not.
    #[error("the control page's proof does not match its token")]
    Content,
}

impl ControlToken {
    /// Checks `page` (at least the record's length, from the start of the control page, as
    /// read through this side's mapping).
    pub fn check(&self, page: &[u8]) -> Result<(), ProofMismatch> {
        let Some(record) = page.get(..PROOF_LEN) else {
            return Err(ProofMismatch::NoRecord);
        };
        if &record[..8] != PROOF_MAGIC {
            return Err(ProofMismatch::NoRecord);
        }
        if record[8..24] != self.nonce.0 {
            let mut found = [0u8; 16];
            found.copy_from_slice(&record[8..24]);
            return Err(ProofMismatch::OtherNonce {
                found: Nonce(found),
                expected: self.nonce,
            });
        }
        let digest: [u8; 32] = Sha256::digest(record).into();
        if digest != self.sha256 {
            return Err(ProofMismatch::Content);
        }
        Ok(())
    }
}

/// Where the destination's "the guest ran here" record starts in the control page (after
/// the proof record, which it never overlaps).
pub const RAN_OFFSET: usize = 512;
/// The ran record's first bytes.
pub const RAN_MAGIC: &[u8; 8] = b"VMBEAMR1";
/// The ran record's length: magic and the migration's proof nonce.
pub const RAN_LEN: usize = 8 + 16;

// The proof record and the ran record never overlap, and both fit the page.
const _: () = assert!(PROOF_LEN <= RAN_OFFSET && RAN_OFFSET + RAN_LEN <= 4096);

/// The record a zero-copy destination writes at [`RAN_OFFSET`] once the guest runs there:
/// the host-device pool's counterpart of the directory pool's `.ran` marker. It names the
/// migration by its proof's nonce, so a record an earlier migration left never counts for
/// a later one (whose proof has another nonce).
pub fn ran_record(nonce: &Nonce) -> [u8; RAN_LEN] {
    let mut r = [0u8; RAN_LEN];
    r[..8].copy_from_slice(RAN_MAGIC);
    r[8..].copy_from_slice(&nonce.0);
    r
}

/// Whether `record` (read from [`RAN_OFFSET`]) says the guest ran at the destination of the
/// migration whose proof had `nonce`.
pub fn has_ran(record: &[u8], nonce: &Nonce) -> bool {
    record.get(..RAN_LEN) == Some(&ran_record(nonce)[..])
}

/// `<nonce hex>:<sha256 hex>`, how the token travels in text.
impl fmt::Display for ControlToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.nonce.to_hex(), hex::encode(self.sha256))
    }
}

/// A text that is not `<32 hex digits>:<64 hex digits>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a control-page proof token (<32 hex digits>:<64 hex digits>)")]
pub struct BadToken;

impl FromStr for ControlToken {
    type Err = BadToken;

    fn from_str(s: &str) -> Result<Self, BadToken> {
        let (nonce, sha) = s.split_once(':').ok_or(BadToken)?;
        let mut n = [0u8; 16];
        let mut d = [0u8; 32];
        hex::decode_to_slice(nonce, &mut n).map_err(|_| BadToken)?;
        hex::decode_to_slice(sha, &mut d).map_err(|_| BadToken)?;
        Ok(Self {
            nonce: Nonce(n),
            sha256: d,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_bytes_prove_and_anything_else_does_not() {
        let proof = ControlProof::fresh();
        let token = proof.token();
        let mut page = vec![0u8; 4096];
        assert_eq!(token.check(&page), Err(ProofMismatch::NoRecord));
        page[..PROOF_LEN].copy_from_slice(proof.record());
        assert_eq!(token.check(&page), Ok(()));
        assert_eq!(
            token.check(&page[..PROOF_LEN - 1]),
            Err(ProofMismatch::NoRecord)
        );

        let other = ControlProof::fresh();
        assert!(matches!(
            other.token().check(&page),
            Err(ProofMismatch::OtherNonce { expected, .. }) if expected == other.token().nonce
        ));
        page[PROOF_LEN - 1] ^= 1;
        assert_eq!(token.check(&page), Err(ProofMismatch::Content));
    }

    #[test]
    fn proofs_are_fresh_and_the_secret_stays_out_of_debug() {
        let (a, b) = (ControlProof::fresh(), ControlProof::fresh());
        assert_ne!(a.record(), b.record());
        assert_eq!(&a.record()[..8], PROOF_MAGIC);
        let secret = hex::encode(&a.record()[24..]);
        assert!(!format!("{a:?}").contains(&secret));
    }

    #[test]
    fn a_ran_record_counts_only_for_its_own_migration() {
        let (this, earlier) = (ControlProof::fresh().token(), ControlProof::fresh().token());
        let mut page = vec![0u8; 4096];
        assert!(!has_ran(&page[RAN_OFFSET..], &this.nonce));
        page[RAN_OFFSET..RAN_OFFSET + RAN_LEN].copy_from_slice(&ran_record(&earlier.nonce));
        assert!(!has_ran(&page[RAN_OFFSET..], &this.nonce), "a stale record");
        page[RAN_OFFSET..RAN_OFFSET + RAN_LEN].copy_from_slice(&ran_record(&this.nonce));
        assert!(has_ran(&page[RAN_OFFSET..], &this.nonce));
        assert!(!has_ran(&page[RAN_OFFSET..RAN_OFFSET + 3], &this.nonce));
    }

    #[test]
    fn the_token_travels_as_text() {
        let token = ControlProof::fresh().token();
        let text = token.to_string();
        assert_eq!(text.len(), 32 + 1 + 64);
        assert_eq!(text.parse::<ControlToken>(), Ok(token));
        for bad in [
            "",
            ":",
            "zz:00",
            &text[1..],
            &text.replace(':', "-"),
            &format!("{text}0"),
        ] {
            assert_eq!(bad.parse::<ControlToken>(), Err(BadToken), "{bad}");
        }
    }
}
