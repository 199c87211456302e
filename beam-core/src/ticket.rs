//! Tickets: the agreement between a migration's source and destination.
//!
//! The source issues a ticket naming the cloud, the domain, the pool file (with the
//! device/inode the source sees), both hosts, a validity window and a random nonce, and
//! signs it with the cloud's shared HMAC-SHA256 key. The destination verifies it before it
//! links anything to the pool file: right key (same virtual IaaS cloud), addressed to it,
//! for the expected domain, within its validity window, and never seen before.
//!
//! The MAC covers a canonical binary encoding (fixed field order, integers big-endian,
//! strings length-prefixed), so the signature never depends on how a serialiser orders or
//! spaces fields. [`Ticket::encode`] turns that encoding and the MAC into one printable
//! token (`vmbt1.` + base64url), safe in a libvirt migration parameter or XML metadata.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::b64;
use crate::ids::{CloudId, DomainUuid, FileIdentity, HostId, Nonce};

type HmacSha256 = Hmac<Sha256>;

/// The ticket format version this code issues and accepts.
pub const TICKET_VERSION: u8 = 1;
/// Clock difference tolerated between source and destination, in seconds.
pub const CLOCK_SKEW_SECS: u64 = 5;
/// The longest validity a ticket may have, in seconds.
pub const MAX_TICKET_TTL_SECS: u64 = 600;
/// The shortest key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 32;
/// Prefix of an encoded ticket.
pub const ENCODED_PREFIX: &str = "vmbt1.";

const MAGIC: &[u8; 4] = b"VMBT";
const MAC_LEN: usize = 32;

/// Why a ticket could not be issued, decoded or accepted.
#[derive(Debug, thiserror::Error)]
pub enum TicketError {
    /// The MAC does not match: wrong key (another cloud) or altered content.
    #[error("ticket signature is invalid (forged, altered or signed with another cloud's key)")]
    Forged,
    /// The validity window has passed.
    #[error("ticket expired at {expires_at} (now {now})")]
    Expired {
        /// When it expired (Unix seconds).
        expires_at: u64,
        /// The verifier's clock.
        now: u64,
    },
    /// The ticket was issued in the future, beyond the allowed clock skew.
    #[error("ticket is not valid before {issued_at} (now {now})")]
    NotYetValid {
        /// When it was issued (Unix seconds).
        issued_at: u64,
        /// The verifier's clock.
        now: u64,
    },
    /// The nonce was already used.
    #[error("ticket was already used")]
    Replayed,
    /// Issued for another virtual IaaS cloud.
    #[error("ticket is for cloud '{found}', not '{expected}'")]
    OtherCloud {
        /// This host's cloud.
        expected: CloudId,
        /// The ticket's cloud.
        found: CloudId,
    },
    /// Addressed to another destination.
    #[error("ticket is for destination {found}, not {expected}")]
    WrongDestination {
        /// This host.
        expected: HostId,
        /// The ticket's destination.
        found: HostId,
    },
    /// Issued by another source than expected.
    #[error("ticket was issued by {found}, not {expected}")]
    WrongSource {
        /// The expected source.
        expected: HostId,
        /// The ticket's source.
        found: HostId,
    },
    /// Issued for another domain.
    #[error("ticket is for domain {found}, not {expected}")]
    WrongDomain {
        /// The domain being migrated.
        expected: DomainUuid,
        /// The ticket's domain.
        found: DomainUuid,
    },
    /// The pool file the destination sees is not the one the source saw.
    #[error("ticket names pool file {found}, but this host sees {expected}")]
    WrongPoolFile {
        /// The identity seen here.
        expected: FileIdentity,
        /// The identity in the ticket.
        found: FileIdentity,
    },
    /// The ticket cannot be decoded or its content is invalid.
    #[error("malformed ticket: {0}")]
    Malformed(&'static str),
    /// A ticket format this code does not know.
    #[error("unsupported ticket version {0}")]
    UnsupportedVersion(u8),
    /// Issuing was asked for a validity outside `1..=MAX_TICKET_TTL_SECS`.
    #[error("ticket lifetime must be between 1 and {MAX_TICKET_TTL_SECS} seconds")]
    BadTtl,
    /// A field is too long to encode.
    #[error("ticket field {0} is too long")]
    FieldTooLong(&'static str),
    /// The key is shorter than [`MIN_KEY_LEN`].
    #[error("ticket key has {0} bytes, at least {MIN_KEY_LEN} are required")]
    KeyTooShort(usize),
    /// The replay cache could not be read or written (verification fails closed).
    #[error("replay cache failure")]
    ReplayCache(#[source] io::Error),
}

/// The cloud's shared secret for signing tickets (at least [`MIN_KEY_LEN`] bytes).
#[derive(Clone)]
pub struct TicketKey(Vec<u8>);

impl TicketKey {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, TicketError> {
        if bytes.len() < MIN_KEY_LEN {
            return Err(TicketError::KeyTooShort(bytes.len()));
        }
        Ok(Self(bytes))
    }

    /// Interprets a key file's content: if it is only hexadecimal digits (surrounding
    /// whitespace ignored, even count) it is hex-decoded, otherwise the bytes are the key.
    pub fn from_file_content(content: &[u8]) -> Result<Self, TicketError> {
        let trimmed = content.trim_ascii();
        let is_hex = !trimmed.is_empty()
            && trimmed.len() % 2 == 0
            && trimmed.iter().all(u8::is_ascii_hexdigit);
        if is_hex {
            // Checked above: only hex digits, even length.
            let bytes = hex::decode(trimmed).map_err(|_| TicketError::Malformed("key"))?;
            Self::from_bytes(bytes)
        } else {
            Self::from_bytes(content.to_vec())
        }
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC accepts keys of any length.
        <HmacSha256 as Mac>::new_from_slice(&self.0).expect("HMAC takes keys of any length")
    }

    /// HMAC-SHA256 of `data` under this key, for other messages between the cloud's VMBeam
    /// daemons (the caller puts a context label in `data` to keep uses apart).
    pub fn sign(&self, data: &[u8]) -> [u8; MAC_LEN] {
        let mut m = self.mac();
        m.update(data);
        m.finalize().into_bytes().into()
    }

    /// Checks a MAC made by [`TicketKey::sign`], in constant time.
    pub fn verify_signature(&self, data: &[u8], mac: &[u8]) -> bool {
        let mut m = self.mac();
        m.update(data);
        m.verify_slice(mac).is_ok()
    }
}

impl fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TicketKey({} bytes, redacted)", self.0.len())
    }
}

/// What the source puts in a ticket; [`Ticket::issue`] adds the times, nonce and MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketFields {
    /// The virtual IaaS cloud of both ends.
    pub cloud: CloudId,
    /// The migrating domain.
    pub domain_uuid: DomainUuid,
    /// Its name (informational; the UUID is what is checked).
    pub domain_name: String,
    /// The pool file's name inside the pool.
    pub pool_file: String,
    /// The pool file's device and inode as the source sees them.
    pub pool_identity: FileIdentity,
    /// The issuing host.
    pub source_host: HostId,
    /// The host the ticket is for.
    pub dest_host: HostId,
    /// Validity in seconds (`1..=MAX_TICKET_TTL_SECS`).
    pub ttl_secs: u64,
}

/// A signed agreement for one zero-copy migration. Changing any field invalidates the MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// Format version ([`TICKET_VERSION`]).
    pub version: u8,
    /// The virtual IaaS cloud.
    pub cloud: CloudId,
    /// The migrating domain.
    pub domain_uuid: DomainUuid,
    /// The domain's name.
    pub domain_name: String,
    /// The pool file's name.
    pub pool_file: String,
    /// The pool file's device number at the source.
    pub pool_dev: u64,
    /// The pool file's inode number at the source.
    pub pool_ino: u64,
    /// The issuing host.
    pub source_host: HostId,
    /// The destination host.
    pub dest_host: HostId,
    /// Issue time, Unix seconds.
    pub issued_at: u64,
    /// Expiry time, Unix seconds.
    pub expires_at: u64,
    /// Random, single-use.
    pub nonce: Nonce,
    /// HMAC-SHA256 over the canonical encoding.
    pub mac: [u8; MAC_LEN],
}

/// What the verifier knows independently of the ticket.
#[derive(Debug, Clone, Copy)]
pub struct Expectations<'a> {
    /// This host's cloud.
    pub cloud: &'a CloudId,
    /// This host (the destination).
    pub dest_host: &'a HostId,
    /// The domain being migrated in.
    pub domain_uuid: &'a DomainUuid,
    /// The expected source, when known.
    pub source_host: Option<&'a HostId>,
    /// The pool file's device/inode as seen here, when comparable with the source's view
    /// (same kernel; see [`crate::pool`]).
    pub pool_identity: Option<FileIdentity>,
}

impl Ticket {
    /// Issues and signs a ticket valid from `now` for `fields.ttl_secs` seconds.
    pub fn issue(key: &TicketKey, fields: TicketFields, now: u64) -> Result<Self, TicketError> {
        Self::issue_with_nonce(key, fields, now, Nonce::random())
    }

    fn issue_with_nonce(
        key: &TicketKey,
        fields: TicketFields,
        now: u64,
        nonce: Nonce,
    ) -> Result<Self, TicketError> {
        if fields.ttl_secs == 0 || fields.ttl_secs > MAX_TICKET_TTL_SECS {
            return Err(TicketError::BadTtl);
        }
        let expires_at = now
            .checked_add(fields.ttl_secs)
            .ok_or(TicketError::BadTtl)?;
        let mut ticket = Self {
            version: TICKET_VERSION,
            cloud: fields.cloud,
            domain_uuid: fields.domain_uuid,
            domain_name: fields.domain_name,
            pool_file: fields.pool_file,
            pool_dev: fields.pool_identity.dev,
            pool_ino: fields.pool_identity.ino,
            source_host: fields.source_host,
            dest_host: fields.dest_host,
            issued_at: now,
            expires_at,
            nonce,
            mac: [0; MAC_LEN],
        };
        let body = ticket.body()?;
        let mut mac = key.mac();
        mac.update(&body);
        ticket.mac = mac.finalize().into_bytes().into();
        Ok(ticket)
    }

    /// The pool file identity the source saw.
    pub fn pool_identity(&self) -> FileIdentity {
        FileIdentity {
            dev: self.pool_dev,
            ino: self.pool_ino,
        }
    }

    /// The canonical encoding the MAC covers: magic, version, then every field in a fixed
    /// order; strings as u16 big-endian length + UTF-8, integers as u64 big-endian.
    fn body(&self) -> Result<Vec<u8>, TicketError> {
        fn put_str(out: &mut Vec<u8>, name: &'static str, s: &str) -> Result<(), TicketError> {
            let len = u16::try_from(s.len()).map_err(|_| TicketError::FieldTooLong(name))?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(s.as_bytes());
            Ok(())
        }
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(MAGIC);
        out.push(self.version);
        put_str(&mut out, "cloud", self.cloud.as_str())?;
        put_str(&mut out, "domain_uuid", self.domain_uuid.as_str())?;
        put_str(&mut out, "domain_name", &self.domain_name)?;
        put_str(&mut out, "pool_file", &self.pool_file)?;
        out.extend_from_slice(&self.pool_dev.to_be_bytes());
        out.extend_from_slice(&self.pool_ino.to_be_bytes());
        put_str(&mut out, "source_host", self.source_host.as_str())?;
        put_str(&mut out, "dest_host", self.dest_host.as_str())?;
        out.extend_from_slice(&self.issued_at.to_be_bytes());
        out.extend_from_slice(&self.expires_at.to_be_bytes());
        out.extend_from_slice(&self.nonce.0);
        Ok(out)
    }

    /// The printable token: `vmbt1.` followed by the base64url (unpadded) of the canonical
    /// encoding and the MAC. Only `[A-Za-z0-9._-]` characters.
    pub fn encode(&self) -> Result<String, TicketError> {
        let mut bytes = self.body()?;
        bytes.extend_from_slice(&self.mac);
        Ok(format!("{ENCODED_PREFIX}{}", b64::encode(&bytes)))
    }

    /// Parses a token made by [`Ticket::encode`]. This checks the form only; call
    /// [`Ticket::verify`] before trusting anything in it.
    pub fn decode(token: &str) -> Result<Self, TicketError> {
        let data = token
            .trim()
            .strip_prefix(ENCODED_PREFIX)
            .ok_or(TicketError::Malformed("missing vmbt1. prefix"))?;
        let bytes = b64::decode(data).ok_or(TicketError::Malformed("not base64url"))?;
        if bytes.len() < MAGIC.len() + 1 + MAC_LEN {
            return Err(TicketError::Malformed("too short"));
        }
        let (body, mac) = bytes.split_at(bytes.len() - MAC_LEN);
        let mut r = Cursor { data: body };
        if r.take(MAGIC.len())? != MAGIC {
            return Err(TicketError::Malformed("bad magic"));
        }
        let version = r.take(1)?[0];
        if version != TICKET_VERSION {
            return Err(TicketError::UnsupportedVersion(version));
        }
        let cloud = CloudId::new(r.string()?).map_err(|_| TicketError::Malformed("cloud"))?;
        let domain_uuid =
            DomainUuid::new(&r.string()?).map_err(|_| TicketError::Malformed("domain uuid"))?;
        let domain_name = r.string()?;
        let pool_file = r.string()?;
        let pool_dev = r.u64()?;
        let pool_ino = r.u64()?;
        let source_host =
            HostId::new(r.string()?).map_err(|_| TicketError::Malformed("source host"))?;
        let dest_host =
            HostId::new(r.string()?).map_err(|_| TicketError::Malformed("destination host"))?;
        let issued_at = r.u64()?;
        let expires_at = r.u64()?;
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(r.take(16)?);
        if !r.data.is_empty() {
            return Err(TicketError::Malformed("trailing bytes"));
        }
        let mut mac_bytes = [0u8; MAC_LEN];
        mac_bytes.copy_from_slice(mac);
        let t = Self {
            version,
            cloud,
            domain_uuid,
            domain_name,
            pool_file,
            pool_dev,
            pool_ino,
            source_host,
            dest_host,
            issued_at,
            expires_at,
            nonce: Nonce(nonce),
            mac: mac_bytes,
        };
        // One encoding per ticket: the MAC covers the fields as encoded canonically, so a
        // body that only decodes to them (an upper-case UUID, say) would verify under
        // another spelling. Found by `prop_ticket_single_byte_change_refused`.
        if t.body()? != body {
            return Err(TicketError::Malformed("not canonically encoded"));
        }
        Ok(t)
    }

    /// Checks the ticket, in this order: MAC (constant-time; [`TicketError::Forged`]),
    /// validity window shape, cloud, destination, domain, source and pool identity when
    /// expected, not-yet-valid and expiry (with [`CLOCK_SKEW_SECS`] of slack), and finally
    /// the replay cache, which records the nonce only when everything else passed.
    pub fn verify(
        &self,
        key: &TicketKey,
        expected: &Expectations<'_>,
        now: u64,
        replay_cache: &mut dyn ReplayCache,
    ) -> Result<(), TicketError> {
        let body = self.body()?;
        let mut mac = key.mac();
        mac.update(&body);
        mac.verify_slice(&self.mac)
            .map_err(|_| TicketError::Forged)?;
        if self.version != TICKET_VERSION {
            return Err(TicketError::UnsupportedVersion(self.version));
        }
        if self.expires_at <= self.issued_at
            || self.expires_at - self.issued_at > MAX_TICKET_TTL_SECS
        {
            return Err(TicketError::Malformed("validity window"));
        }
        if &self.cloud != expected.cloud {
            return Err(TicketError::OtherCloud {
                expected: expected.cloud.clone(),
                found: self.cloud.clone(),
            });
        }
        if &self.dest_host != expected.dest_host {
            return Err(TicketError::WrongDestination {
                expected: expected.dest_host.clone(),
                found: self.dest_host.clone(),
            });
        }
        if &self.domain_uuid != expected.domain_uuid {
            return Err(TicketError::WrongDomain {
                expected: expected.domain_uuid.clone(),
                found: self.domain_uuid.clone(),
            });
        }
        if let Some(source) = expected.source_host {
            if &self.source_host != source {
                return Err(TicketError::WrongSource {
                    expected: source.clone(),
                    found: self.source_host.clone(),
                });
            }
        }
        if let Some(identity) = expected.pool_identity {
            if identity != self.pool_identity() {
                return Err(TicketError::WrongPoolFile {
                    expected: identity,
                    found: self.pool_identity(),
                });
            }
        }
        if self.issued_at > now.saturating_add(CLOCK_SKEW_SECS) {
            return Err(TicketError::NotYetValid {
                issued_at: self.issued_at,
                now,
            });
        }
        let keep_until = self.expires_at.saturating_add(CLOCK_SKEW_SECS);
        if now > keep_until {
            return Err(TicketError::Expired {
                expires_at: self.expires_at,
                now,
            });
        }
        let fresh = replay_cache
            .record(&self.nonce, keep_until)
            .map_err(TicketError::ReplayCache)?;
        if !fresh {
            return Err(TicketError::Replayed);
        }
        Ok(())
    }
}

struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TicketError> {
        if self.data.len() < n {
            return Err(TicketError::Malformed("truncated"));
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64, TicketError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(b))
    }

    fn string(&mut self) -> Result<String, TicketError> {
        let mut len = [0u8; 2];
        len.copy_from_slice(self.take(2)?);
        let bytes = self.take(usize::from(u16::from_be_bytes(len)))?;
        String::from_utf8(bytes.to_vec()).map_err(|_| TicketError::Malformed("not UTF-8"))
    }
}

/// Remembers used nonces until their tickets can no longer be valid.
pub trait ReplayCache {
    /// Atomically records `nonce` as used until `keep_until` (Unix seconds). Returns
    /// `Ok(false)` when it was already recorded.
    fn record(&mut self, nonce: &Nonce, keep_until: u64) -> io::Result<bool>;

    /// Forgets nonces kept until before `now`; returns how many were forgotten.
    fn prune(&mut self, now: u64) -> io::Result<usize>;
}

/// A replay cache in memory, for tests and single-process use.
#[derive(Debug, Default, Clone)]
pub struct MemoryReplayCache {
    seen: HashMap<Nonce, u64>,
}

impl MemoryReplayCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many nonces are remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no nonce is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

impl ReplayCache for MemoryReplayCache {
    fn record(&mut self, nonce: &Nonce, keep_until: u64) -> io::Result<bool> {
        if self.seen.contains_key(nonce) {
            return Ok(false);
        }
        self.seen.insert(*nonce, keep_until);
        Ok(true)
    }

    fn prune(&mut self, now: u64) -> io::Result<usize> {
        let before = self.seen.len();
        self.seen.retain(|_, keep_until| *keep_until >= now);
        Ok(before - self.seen.len())
    }
}

/// A replay cache on disk: one file per nonce (named by its hex, holding the Unix time it
/// may be forgotten), so separate processes share it. A nonce file appears atomically with
/// its content (written aside, then hard-linked into place, which fails if the name exists).
#[derive(Debug, Clone)]
pub struct FileReplayCache {
    dir: PathBuf,
}

impl FileReplayCache {
    /// Uses `dir`, creating it (mode 0700) if needed.
    pub fn open(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let dir = dir.into();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        Ok(Self { dir })
    }

    /// The directory holding the nonce files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl ReplayCache for FileReplayCache {
    fn record(&mut self, nonce: &Nonce, keep_until: u64) -> io::Result<bool> {
        let name = nonce.to_hex();
        let target = self.dir.join(&name);
        let tmp = self
            .dir
            .join(format!(".{name}.{}.tmp", hex::encode(Nonce::random().0)));
        let result = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            writeln!(f, "{keep_until}")?;
            f.sync_all()?;
            match fs::hard_link(&tmp, &target) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(e),
            }
        })();
        let _ = fs::remove_file(&tmp);
        result
    }

    fn prune(&mut self, now: u64) -> io::Result<usize> {
        let mut removed = 0;
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.parse::<Nonce>().is_err() {
                continue;
            }
            let keep_until = match fs::read_to_string(entry.path()) {
                Ok(s) => s.trim().parse::<u64>().ok(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            // An unreadable record is kept: forgetting a nonce too early reopens a replay.
            if keep_until.is_some_and(|k| k < now) {
                match fs::remove_file(entry.path()) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> TicketKey {
        TicketKey::from_bytes(vec![7u8; 32]).unwrap()
    }

    fn fields() -> TicketFields {
        TicketFields {
            cloud: CloudId::new("acme").unwrap(),
            domain_uuid: DomainUuid::new("6e3b1e9a-1b2c-4d5e-8f90-0123456789ab").unwrap(),
            domain_name: "web1".into(),
            pool_file: "6e3b1e9a-1b2c-4d5e-8f90-0123456789ab.3.ram".into(),
            pool_identity: FileIdentity { dev: 42, ino: 4242 },
            source_host: HostId::new("cvm1").unwrap(),
            dest_host: HostId::new("cvm2").unwrap(),
            ttl_secs: 30,
        }
    }

    struct Ctx {
        cloud: CloudId,
        dest: HostId,
        uuid: DomainUuid,
        source: HostId,
    }

    impl Ctx {
        fn new() -> Self {
            let f = fields();
            Self {
                cloud: f.cloud,
                dest: f.dest_host,
                uuid: f.domain_uuid,
                source: f.source_host,
            }
        }
        fn expect(&self) -> Expectations<'_> {
            Expectations {
                cloud: &self.cloud,
                dest_host: &self.dest,
                domain_uuid: &self.uuid,
                source_host: Some(&self.source),
                pool_identity: Some(FileIdentity { dev: 42, ino: 4242 }),
            }
        }
    }

    const NOW: u64 = 1_700_000_000;

    #[test]
    fn issue_encode_decode_verify() {
        let t = Ticket::issue(&key(), fields(), NOW).unwrap();
        assert_eq!(t.expires_at, NOW + 30);
        let token = t.encode().unwrap();
        assert!(token.starts_with("vmbt1."));
        assert!(token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
        let back = Ticket::decode(&token).unwrap();
        assert_eq!(back, t);
        let ctx = Ctx::new();
        let mut cache = MemoryReplayCache::new();
        back.verify(&key(), &ctx.expect(), NOW + 1, &mut cache)
            .unwrap();
        assert_eq!(cache.len(), 1);
        // Second use of the same ticket.
        assert!(matches!(
            back.verify(&key(), &ctx.expect(), NOW + 2, &mut cache),
            Err(TicketError::Replayed)
        ));
    }

    #[test]
    fn nonces_differ() {
        let a = Ticket::issue(&key(), fields(), NOW).unwrap();
        let b = Ticket::issue(&key(), fields(), NOW).unwrap();
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.mac, b.mac);
    }

    #[test]
    fn forged() {
        let ctx = Ctx::new();
        let t = Ticket::issue(&key(), fields(), NOW).unwrap();
        let other_key = TicketKey::from_bytes(vec![8u8; 32]).unwrap();
        assert!(matches!(
            t.verify(
                &other_key,
                &ctx.expect(),
                NOW,
                &mut MemoryReplayCache::new()
            ),
            Err(TicketError::Forged)
        ));
        // Any altered field breaks the MAC, including the ones checked later.
        let mut altered = t.clone();
        altered.expires_at += 1000;
        assert!(matches!(
            altered.verify(&key(), &ctx.expect(), NOW, &mut MemoryReplayCache::new()),
            Err(TicketError::Forged)
        ));
        let mut altered = t.clone();
        altered.pool_ino = 1;
        assert!(matches!(
            altered.verify(&key(), &ctx.expect(), NOW, &mut MemoryReplayCache::new()),
            Err(TicketError::Forged)
        ));
        // Flipping a bit in the token.
        let token = t.encode().unwrap();
        let mut bytes = b64::decode(&token[ENCODED_PREFIX.len()..]).unwrap();
        let i = bytes.len() - 40;
        bytes[i] ^= 1;
        let tampered = format!("{ENCODED_PREFIX}{}", b64::encode(&bytes));
        let decoded = Ticket::decode(&tampered).unwrap();
        assert!(matches!(
            decoded.verify(&key(), &ctx.expect(), NOW, &mut MemoryReplayCache::new()),
            Err(TicketError::Forged)
        ));
    }

    #[test]
    fn length_prefixes_make_fields_unambiguous() {
        // Moving a character from one string field to the next keeps the concatenation
        // identical but must change the signed bytes.
        let mut a = fields();
        a.domain_name = "web1x".into();
        a.pool_file = "y".into();
        let mut b = fields();
        b.domain_name = "web1".into();
        b.pool_file = "xy".into();
        let nonce = Nonce([1; 16]);
        let ta = Ticket::issue_with_nonce(&key(), a, NOW, nonce).unwrap();
        let tb = Ticket::issue_with_nonce(&key(), b, NOW, nonce).unwrap();
        assert_ne!(ta.mac, tb.mac);
    }

    #[test]
    fn time_checks() {
        let ctx = Ctx::new();
        let t = Ticket::issue(&key(), fields(), NOW).unwrap();
        let mut cache = MemoryReplayCache::new();
        assert!(matches!(
            t.verify(
                &key(),
                &ctx.expect(),
                NOW + 30 + CLOCK_SKEW_SECS + 1,
                &mut cache
            ),
            Err(TicketError::Expired { .. })
        ));
        assert!(matches!(
            t.verify(&key(), &ctx.expect(), NOW - CLOCK_SKEW_SECS - 1, &mut cache),
            Err(TicketError::NotYetValid { .. })
        ));
        // Rejected tickets do not consume the nonce.
        assert!(cache.is_empty());
        // Within the skew allowance on both sides.
        t.verify(&key(), &ctx.expect(), NOW - CLOCK_SKEW_SECS, &mut cache)
            .unwrap();
        let t2 = Ticket::issue(&key(), fields(), NOW).unwrap();
        t2.verify(
            &key(),
            &ctx.expect(),
            NOW + 30 + CLOCK_SKEW_SECS,
            &mut cache,
        )
        .unwrap();
    }

    #[test]
    fn wrong_parties() {
        let ctx = Ctx::new();
        let t = Ticket::issue(&key(), fields(), NOW).unwrap();
        let other_cloud = CloudId::new("other").unwrap();
        let other_host = HostId::new("cvm3").unwrap();
        let other_uuid = DomainUuid::new("00000000-0000-0000-0000-000000000001").unwrap();
        let mut cache = MemoryReplayCache::new();
        let e = Expectations {
            cloud: &other_cloud,
            ..ctx.expect()
        };
        let err = t.verify(&key(), &e, NOW, &mut cache).unwrap_err();
        assert!(matches!(err, TicketError::OtherCloud { .. }));
        assert_eq!(err.to_string(), "ticket is for cloud 'acme', not 'other'");
        let e = Expectations {
            dest_host: &other_host,
            ..ctx.expect()
        };
        assert!(matches!(
            t.verify(&key(), &e, NOW, &mut cache),
            Err(TicketError::WrongDestination { .. })
        ));
        let e = Expectations {
            domain_uuid: &other_uuid,
            ..ctx.expect()
        };
        assert!(matches!(
            t.verify(&key(), &e, NOW, &mut cache),
            Err(TicketError::WrongDomain { .. })
        ));
        let e = Expectations {
            source_host: Some(&other_host),
            ..ctx.expect()
        };
        assert!(matches!(
            t.verify(&key(), &e, NOW, &mut cache),
            Err(TicketError::WrongSource { .. })
        ));
        let e = Expectations {
            pool_identity: Some(FileIdentity { dev: 42, ino: 1 }),
            ..ctx.expect()
        };
        assert!(matches!(
            t.verify(&key(), &e, NOW, &mut cache),
            Err(TicketError::WrongPoolFile { .. })
        ));
        let e = Expectations {
            source_host: None,
            pool_identity: None,
            ..ctx.expect()
        };
        t.verify(&key(), &e, NOW, &mut cache).unwrap();
    }

    #[test]
    fn malformed_tokens() {
        let t = Ticket::issue(&key(), fields(), NOW).unwrap();
        let token = t.encode().unwrap();
        let raw = b64::decode(&token[ENCODED_PREFIX.len()..]).unwrap();
        let with = |bytes: &[u8]| format!("{ENCODED_PREFIX}{}", b64::encode(bytes));
        let cases: Vec<String> = vec![
            String::new(),
            "vmbt2.AAAA".into(),
            token[ENCODED_PREFIX.len()..].to_string(),
            format!("{token}!"),
            format!("{token}A"),
            with(&raw[..raw.len() - 1]),
            with(&raw[..10]),
            with(&[raw.as_slice(), &[0]].concat()),
            with(&[b"XXXX".as_slice(), &raw[4..]].concat()),
        ];
        for c in &cases {
            let err = Ticket::decode(c).unwrap_err();
            assert!(
                matches!(err, TicketError::Malformed(_) | TicketError::Forged),
                "{c}: {err:?}"
            );
        }
        let mut v2 = raw.clone();
        v2[4] = 2;
        assert!(matches!(
            Ticket::decode(&with(&v2)),
            Err(TicketError::UnsupportedVersion(2))
        ));
        // A bad identifier inside the body.
        let mut bad = raw.clone();
        bad[7] = b'/'; // first byte of the cloud name
        assert!(matches!(
            Ticket::decode(&with(&bad)),
            Err(TicketError::Malformed("cloud"))
        ));
    }

    #[test]
    fn issue_limits() {
        let mut f = fields();
        f.ttl_secs = 0;
        assert!(matches!(
            Ticket::issue(&key(), f, NOW),
            Err(TicketError::BadTtl)
        ));
        let mut f = fields();
        f.ttl_secs = MAX_TICKET_TTL_SECS + 1;
        assert!(matches!(
            Ticket::issue(&key(), f, NOW),
            Err(TicketError::BadTtl)
        ));
        let mut f = fields();
        f.domain_name = "x".repeat(70_000);
        assert!(matches!(
            Ticket::issue(&key(), f, NOW),
            Err(TicketError::FieldTooLong("domain_name"))
        ));
    }

    #[test]
    fn keys() {
        assert!(matches!(
            TicketKey::from_bytes(vec![0; 31]),
            Err(TicketError::KeyTooShort(31))
        ));
        let hex_key = format!("{}\n", "ab".repeat(32));
        let k = TicketKey::from_file_content(hex_key.as_bytes()).unwrap();
        assert_eq!(k.0, vec![0xab; 32]);
        // 31 bytes in hex is too short even though the text is 62 bytes.
        assert!(matches!(
            TicketKey::from_file_content("ab".repeat(31).as_bytes()),
            Err(TicketError::KeyTooShort(31))
        ));
        let raw: Vec<u8> = (0..40u8).collect();
        assert_eq!(TicketKey::from_file_content(&raw).unwrap().0, raw);
        assert!(!format!("{k:?}").contains("ab"));
    }

    #[test]
    fn memory_cache_prunes() {
        let mut c = MemoryReplayCache::new();
        assert!(c.record(&Nonce([1; 16]), 10).unwrap());
        assert!(c.record(&Nonce([2; 16]), 20).unwrap());
        assert!(!c.record(&Nonce([1; 16]), 10).unwrap());
        assert_eq!(c.prune(15).unwrap(), 1);
        assert!(c.record(&Nonce([1; 16]), 30).unwrap());
    }

    #[test]
    fn file_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replay");
        let mut a = FileReplayCache::open(&path).unwrap();
        let mut b = FileReplayCache::open(&path).unwrap();
        let n1 = Nonce([1; 16]);
        let n2 = Nonce([2; 16]);
        assert!(a.record(&n1, 100).unwrap());
        // A second process sees the first's record.
        assert!(!b.record(&n1, 100).unwrap());
        assert!(b.record(&n2, 200).unwrap());
        fs::write(path.join("unrelated"), "x").unwrap();
        assert_eq!(a.prune(150).unwrap(), 1);
        assert!(a.record(&n1, 300).unwrap());
        assert!(!a.record(&n2, 300).unwrap());
        // No temporary files are left behind.
        let mut names: Vec<String> = fs::read_dir(&path)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, vec![n1.to_hex(), n2.to_hex(), "unrelated".into()]);

        // Verification through the file cache.
        let ctx = Ctx::new();
        let t = Ticket::issue(&key(), fields(), NOW).unwrap();
        t.verify(&key(), &ctx.expect(), NOW, &mut a).unwrap();
        assert!(matches!(
            t.verify(&key(), &ctx.expect(), NOW, &mut b),
            Err(TicketError::Replayed)
        ));
    }

    #[test]
    fn file_cache_failure_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replay");
        let mut c = FileReplayCache::open(&path).unwrap();
        fs::remove_dir(&path).unwrap();
        let ctx = Ctx::new();
        let t = Ticket::issue(&key(), fields(), NOW).unwrap();
        assert!(matches!(
            t.verify(&key(), &ctx.expect(), NOW, &mut c),
            Err(TicketError::ReplayCache(_))
        ));
    }
}

#[cfg(test)]
mod prop_tests {
    use proptest::prelude::*;

    use super::*;
    use crate::proptest_support::proptest_config;

    fn key() -> TicketKey {
        TicketKey::from_bytes(vec![7u8; 32]).unwrap()
    }

    prop_compose! {
        fn valid_ticket()(
            domain_name in ".{0,40}",
            pool_file in "[a-z0-9.-]{0,60}",
            dev in any::<u64>(),
            ino in any::<u64>(),
            ttl_secs in 1..=MAX_TICKET_TTL_SECS,
            now in 0..u64::MAX - MAX_TICKET_TTL_SECS,
            nonce in any::<[u8; 16]>(),
        ) -> Ticket {
            let fields = TicketFields {
                cloud: CloudId::new("acme").unwrap(),
                domain_uuid: DomainUuid::new("6e3b1e9a-1b2c-4d5e-8f90-0123456789ab").unwrap(),
                domain_name,
                pool_file,
                pool_identity: FileIdentity { dev, ino },
                source_host: HostId::new("cvm1").unwrap(),
                dest_host: HostId::new("cvm2").unwrap(),
                ttl_secs,
            };
            Ticket::issue_with_nonce(&key(), fields, now, Nonce(nonce)).unwrap()
        }
    }

    /// Decodes `token` and verifies it at its issue time with a fresh cache and the
    /// expectations of the tickets made by `valid_ticket`.
    fn decode_and_verify(token: &str) -> Result<Ticket, TicketError> {
        let t = Ticket::decode(token)?;
        let cloud = CloudId::new("acme").unwrap();
        let dest = HostId::new("cvm2").unwrap();
        let uuid = DomainUuid::new("6e3b1e9a-1b2c-4d5e-8f90-0123456789ab").unwrap();
        let expected = Expectations {
            cloud: &cloud,
            dest_host: &dest,
            domain_uuid: &uuid,
            source_host: None,
            pool_identity: None,
        };
        let now = t.issued_at;
        t.verify(&key(), &expected, now, &mut MemoryReplayCache::new())?;
        Ok(t)
    }

    /// A ticket whose UUID is spelled in upper case decodes to the same fields as the
    /// issued one, so its MAC would verify: it is refused as not canonical.
    #[test]
    fn a_non_canonical_spelling_of_a_ticket_is_refused() {
        let t = Ticket::issue_with_nonce(
            &key(),
            TicketFields {
                cloud: CloudId::new("acme").unwrap(),
                domain_uuid: DomainUuid::new("6e3b1e9a-1b2c-4d5e-8f90-0123456789ab").unwrap(),
                domain_name: "web1".into(),
                pool_file: "f".into(),
                pool_identity: FileIdentity { dev: 1, ino: 2 },
                source_host: HostId::new("cvm1").unwrap(),
                dest_host: HostId::new("cvm2").unwrap(),
                ttl_secs: 30,
            },
            1000,
            Nonce([3; 16]),
        )
        .unwrap();
        let token = t.encode().unwrap();
        let mut bytes = b64::decode(token.strip_prefix(ENCODED_PREFIX).unwrap()).unwrap();
        let at = bytes.windows(8).position(|w| w == b"6e3b1e9a").unwrap();
        bytes[at..at + 8].copy_from_slice(b"6E3B1E9A");
        let spelled = format!("{ENCODED_PREFIX}{}", b64::encode(&bytes));
        assert!(matches!(
            Ticket::decode(&spelled),
            Err(TicketError::Malformed("not canonically encoded"))
        ));
        assert_eq!(decode_and_verify(&token).unwrap(), t);
    }

    proptest! {
        #![proptest_config(proptest_config())]

        #[test]
        fn prop_ticket_decode_arbitrary_text_never_panics(s in any::<String>()) {
            let _ = Ticket::decode(&s);
            let _ = Ticket::decode(&format!("{ENCODED_PREFIX}{s}"));
        }

        #[test]
        fn prop_ticket_decode_arbitrary_bytes_round_trips(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let token = format!("{ENCODED_PREFIX}{}", b64::encode(&bytes));
            if let Ok(t) = Ticket::decode(&token) {
                // Whatever decodes re-encodes to the very same token (one encoding each).
                prop_assert_eq!(t.encode().unwrap(), token);
                // And a MAC made of arbitrary bytes does not verify.
                prop_assert!(decode_and_verify(&t.encode().unwrap()).is_err());
            }
        }

        #[test]
        fn prop_ticket_round_trip_and_verify(t in valid_ticket()) {
            let token = t.encode().unwrap();
            let back = decode_and_verify(&token).unwrap();
            prop_assert_eq!(back, t);
        }

        #[test]
        fn prop_ticket_single_byte_change_refused(
            t in valid_ticket(),
            pos in any::<prop::sample::Index>(),
            replacement in any::<u8>(),
        ) {
            let token = t.encode().unwrap();
            let mut bytes = token.clone().into_bytes();
            let i = pos.index(bytes.len());
            prop_assume!(bytes[i] != replacement);
            bytes[i] = replacement;
            if let Ok(mutated) = String::from_utf8(bytes) {
                prop_assert!(decode_and_verify(&mutated).is_err(), "{} accepted", mutated);
            }
        }

        #[test]
        fn prop_ticket_truncated_or_extended_refused(
            t in valid_ticket(),
            cut in any::<prop::sample::Index>(),
            tail in "[A-Za-z0-9_-]{1,8}",
        ) {
            let token = t.encode().unwrap();
            let keep = cut.index(token.len());
            prop_assert!(decode_and_verify(&token[..keep]).is_err());
            let extended = format!("{token}{tail}");
            prop_assert!(decode_and_verify(&extended).is_err());
        }
    }
}
