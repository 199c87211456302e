//! The beam pool: a directory on memory that every co-located cloud VM can see (tmpfs in the
//! lab, shared memory between cloud VMs in production), holding the guests' RAM files.
//!
//! - Pool files are named `<domain-uuid>.<generation>.ram` and created at full size without
//!   touching a page (sparse: `set_len` only), before QEMU opens them.
//! - Next to each is an ownership record, `<file>.owner` (JSON): owner host, domain,
//!   generation and state (`active`, `handing-over`, `released`). A record appears
//!   atomically (written aside, then linked or renamed into place); claiming is exclusive.
//!   Only the current owner rewrites its record, so there is a single writer per file.
//! - Co-location is proven through the pool itself: the source writes a proof file with a
//!   random content and sends its hash ([`ProofToken`]); the destination must find and hash
//!   it in its own view of the pool ([`read_proof`]). The request and the answer that carry
//!   the token are files in the pool too, `<nonce>.rdv-req` and `<nonce>.rdv-resp`
//!   ([`crate::rendezvous`]).
//! - Once the guest ran on a zero-copy destination, the destination leaves `<file>.ran`
//!   ([`BeamPool::mark_ran`]): from then on the source must never run the guest again, and
//!   its failure path fences instead of resuming ([`BeamPool::has_ran`]).
//! - [`classify`] names every kind of file the pool holds; [`BeamPool::leftovers`] lists the
//!   ones a crashed process left behind.
//!
//! Device/inode numbers identify a file only within one kernel. Where the pool is shared
//! between separate kernels, both sides' numbers differ even for the same file; the
//! comparisons here assume one kernel (namespaced libvirt instances, the lab).

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ids::{parse_decimal, DomainUuid, FileIdentity, HostId, Nonce};

/// Suffix of pool files.
pub const RAM_SUFFIX: &str = ".ram";
/// Suffix appended to a pool file's name for its ownership record.
pub const OWNER_SUFFIX: &str = ".owner";
/// Suffix of proof files.
pub const PROOF_SUFFIX: &str = ".proof";
/// Suffix appended to a pool file's name for the marker a destination leaves once the guest
/// ran there (see [`BeamPool::mark_ran`]).
pub const RAN_SUFFIX: &str = ".ran";
/// Suffix of a co-location request (`<nonce>.rdv-req`, see [`crate::rendezvous`]).
pub const RDV_REQ_SUFFIX: &str = ".rdv-req";
/// Suffix of a co-location answer (`<nonce>.rdv-resp`, see [`crate::rendezvous`]).
pub const RDV_RESP_SUFFIX: &str = ".rdv-resp";
const TMP_SUFFIX: &str = ".tmp";
const PROOF_MAGIC: &str = "vmbeam-proof-v1";
const MAX_RECORD_LEN: u64 = 64 * 1024;
const MAX_PROOF_LEN: u64 = 4096;

/// Why a pool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// A file-system call failed.
    #[error("cannot {op} {path}")]
    Io {
        /// What was being done ("create", "read", …).
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// A name that is not a plain file name in the pool.
    #[error("invalid pool file name '{0}'")]
    BadName(String),
    /// Creating something that already exists.
    #[error("{0} already exists")]
    Exists(PathBuf),
    /// A pool file or record that should exist does not.
    #[error("{0} does not exist")]
    Missing(PathBuf),
    /// Not a regular file (a directory, a symlink, a device…).
    #[error("{0} is not a regular file")]
    NotRegular(PathBuf),
    /// A pool file of zero bytes was requested.
    #[error("pool file size must be positive")]
    ZeroSize,
    /// A pool file's size is not the guest's memory size.
    #[error("{path} holds {found} bytes, expected {expected}")]
    WrongSize {
        /// The pool file.
        path: PathBuf,
        /// Its size.
        found: u64,
        /// The guest's memory size.
        expected: u64,
    },
    /// An ownership record cannot be parsed.
    #[error("ownership record {path} is corrupt")]
    BadRecord {
        /// The record.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// An ownership record does not describe the file it sits next to.
    #[error("ownership record {0} does not match its pool file")]
    RecordMismatch(PathBuf),
    /// The record names another owner.
    #[error("{path} is owned by {owner}, not {host}")]
    NotOwner {
        /// The pool file.
        path: PathBuf,
        /// The recorded owner.
        owner: HostId,
        /// The host that tried to act as owner.
        host: HostId,
    },
    /// The record is in a state that does not allow the transition.
    #[error("{path} is {found}, expected {expected}")]
    WrongState {
        /// The pool file.
        path: PathBuf,
        /// Its state.
        found: OwnerState,
        /// The state the transition needs.
        expected: OwnerState,
    },
    /// A hand-over is in progress to another host than the one named.
    #[error("{path} is being handed over to {to}, not {expected}")]
    WrongRecipient {
        /// The pool file.
        path: PathBuf,
        /// The recorded recipient.
        to: HostId,
        /// The recipient named by the caller.
        expected: HostId,
    },
    /// The proof file is not visible in this view of the pool.
    #[error("proof file {0} not found in this pool view")]
    ProofMissing(PathBuf),
    /// The proof file exists but its content is not what the source wrote.
    #[error("proof file {0} does not hold the source's content")]
    ProofMismatch(PathBuf),
    /// The proof file here is not the file the source wrote.
    #[error("proof file {path} is {found} here but {expected} at the source")]
    ProofIdentityMismatch {
        /// The proof file.
        path: PathBuf,
        /// Identity at the source.
        expected: FileIdentity,
        /// Identity here.
        found: FileIdentity,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PoolError + 'a {
    move |source| PoolError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The device/inode of `path` (symlinks followed: a linked RAM path reports its target).
pub fn file_identity(path: &Path) -> Result<FileIdentity, PoolError> {
    FileIdentity::of(path).map_err(|e| not_found_or(e, "stat", path))
}

fn not_found_or(e: io::Error, op: &'static str, path: &Path) -> PoolError {
    if e.kind() == io::ErrorKind::NotFound {
        PoolError::Missing(path.to_path_buf())
    } else {
        io_err(op, path)(e)
    }
}

/// The default pool file name for a domain and generation: `<uuid>.<generation>.ram`.
pub fn pool_file_name(uuid: &DomainUuid, generation: u64) -> String {
    format!("{uuid}.{generation}{RAM_SUFFIX}")
}

/// Splits a pool file name into its domain and generation.
pub fn parse_pool_file_name(name: &str) -> Option<(DomainUuid, u64)> {
    let stem = name.strip_suffix(RAM_SUFFIX)?;
    let (uuid, generation) = stem.rsplit_once('.')?;
    let generation = parse_decimal(generation)?;
    Some((DomainUuid::new(uuid).ok()?, generation))
}

/// True for a plain file name: non-empty, at most 255 bytes, no `/` or NUL, not `.`/`..`.
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains(['/', '\0'])
}

/// What a name in the pool directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoolFileKind {
    /// A pool file, `<uuid>.<generation>.ram`.
    Ram,
    /// A pool file's ownership record, `<pool file>.owner`.
    OwnerRecord,
    /// A pool file's marker that the guest ran on the destination, `<pool file>.ran`.
    RanMarker,
    /// A co-location proof, `<nonce>.proof`.
    Proof,
    /// A co-location request, `<nonce>.rdv-req`.
    RendezvousRequest,
    /// A co-location answer, `<nonce>.rdv-resp`.
    RendezvousResponse,
    /// A file being written, `.<name>.tmp` (records and rendezvous messages are written
    /// aside and then renamed or linked into place).
    Temporary,
    /// Not VMBeam's.
    Foreign,
}

/// What the file named `name` in the pool is, by its name alone.
pub fn classify(name: &str) -> PoolFileKind {
    let of_pool_file = |suffix: &str| {
        name.strip_suffix(suffix)
            .is_some_and(|stem| parse_pool_file_name(stem).is_some())
    };
    let of_nonce = |suffix: &str| {
        name.strip_suffix(suffix)
            .is_some_and(|stem| stem.parse::<Nonce>().is_ok())
    };
    if !is_plain_file_name(name) {
        // Never claim a name that is not a plain name inside the pool (`../x.tmp`).
        PoolFileKind::Foreign
    } else if name.starts_with('.') && name.ends_with(TMP_SUFFIX) {
        PoolFileKind::Temporary
    } else if of_pool_file("") {
        PoolFileKind::Ram
    } else if of_pool_file(OWNER_SUFFIX) {
        PoolFileKind::OwnerRecord
    } else if of_pool_file(RAN_SUFFIX) {
        PoolFileKind::RanMarker
    } else if of_nonce(PROOF_SUFFIX) {
        PoolFileKind::Proof
    } else if of_nonce(RDV_REQ_SUFFIX) {
        PoolFileKind::RendezvousRequest
    } else if of_nonce(RDV_RESP_SUFFIX) {
        PoolFileKind::RendezvousResponse
    } else {
        PoolFileKind::Foreign
    }
}

/// The state of a pool file's ownership.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OwnerState {
    /// The owner runs (or may run) the domain on this file.
    Active,
    /// A zero-copy migration to `handing_over_to` is in flight.
    HandingOver,
    /// The owner let go; the file is being deleted.
    Released,
}

impl fmt::Display for OwnerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Active => "active",
            Self::HandingOver => "handing-over",
            Self::Released => "released",
        })
    }
}

/// The content of a `<file>.owner` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnerRecord {
    /// The cloud VM that owns the pool file.
    pub owner: HostId,
    /// The domain whose RAM the file holds.
    pub domain_uuid: DomainUuid,
    /// The metadata generation at the last ownership change.
    pub generation: u64,
    /// The pool file's name.
    pub pool_file: String,
    /// The ownership state.
    pub state: OwnerState,
    /// The recipient while `state` is `handing-over`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handing_over_to: Option<HostId>,
}

/// One pool file (or a record whose file is gone) as listed by [`BeamPool::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolEntry {
    /// The pool file's name.
    pub file_name: String,
    /// The domain, from the name.
    pub domain_uuid: DomainUuid,
    /// The generation, from the name.
    pub generation: u64,
    /// The file's size; `None` when only the record exists.
    pub size: Option<u64>,
    /// The ownership record.
    pub record: RecordStatus,
}

/// What was found next to a pool file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordStatus {
    /// No record.
    Missing,
    /// A valid record.
    Valid(OwnerRecord),
    /// A record that cannot be parsed or does not match (the error's message).
    Corrupt(String),
}

/// What the source sends the destination so it can prove co-location.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProofToken {
    /// Names the proof file (`<nonce>.proof`).
    pub nonce: Nonce,
    /// SHA-256 of the proof file's content, hex.
    pub sha256: String,
    /// The proof file's identity at the source.
    pub identity: FileIdentity,
}

impl ProofToken {
    /// The proof file's name.
    pub fn file_name(&self) -> String {
        format!("{}{PROOF_SUFFIX}", self.nonce)
    }
}

/// Creates `path` new (never reusing an existing file), mode 0600.
fn create_private(path: &Path) -> Result<File, PoolError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                PoolError::Exists(path.to_path_buf())
            } else {
                io_err("create", path)(e)
            }
        })
}

/// Writes a proof file named after `nonce` into `pool_dir`, holding the nonce and 32 fresh
/// random bytes, and returns the token describing it.
pub fn write_proof(pool_dir: &Path, nonce: &Nonce) -> Result<ProofToken, PoolError> {
    let path = pool_dir.join(format!("{nonce}{PROOF_SUFFIX}"));
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let content = format!("{PROOF_MAGIC}\n{nonce}\n{}\n", hex::encode(secret));
    let mut file = create_private(&path)?;
    let written = file
        .write_all(content.as_bytes())
        .and_then(|()| file.metadata());
    let meta = match written {
        Ok(meta) => meta,
        Err(e) => {
            let _ = fs::remove_file(&path);
            return Err(io_err("write", &path)(e));
        }
    };
    Ok(ProofToken {
        nonce: *nonce,
        sha256: hex::encode(Sha256::digest(content.as_bytes())),
        identity: FileIdentity::from_metadata(&meta),
    })
}

/// Reads the proof file described by `token` from this host's view of the pool and checks
/// its content hash and its device/inode against the source's.
pub fn read_proof(pool_dir: &Path, token: &ProofToken) -> Result<(), PoolError> {
    let path = pool_dir.join(token.file_name());
    let (mut file, meta) = open_regular(&path).map_err(|e| match e {
        PoolError::Missing(p) => PoolError::ProofMissing(p),
        other => other,
    })?;
    let mut content = Vec::new();
    io::Read::by_ref(&mut file)
        .take(MAX_PROOF_LEN)
        .read_to_end(&mut content)
        .map_err(io_err("read", &path))?;
    let digest = hex::encode(Sha256::digest(&content));
    if !digest.eq_ignore_ascii_case(&token.sha256) {
        return Err(PoolError::ProofMismatch(path));
    }
    let found = FileIdentity::from_metadata(&meta);
    if found != token.identity {
        return Err(PoolError::ProofIdentityMismatch {
            path,
            expected: token.identity,
            found,
        });
    }
    Ok(())
}

/// Deletes the proof file described by `token` (done by the source once the destination
/// answered, whatever the answer). A missing file is not an error.
pub fn remove_proof(pool_dir: &Path, token: &ProofToken) -> Result<(), PoolError> {
    let path = pool_dir.join(token.file_name());
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", &path)(e)),
    }
}

/// The most a message read from the pool ([`read_message`]) may hold.
pub const MAX_MESSAGE_LEN: u64 = 64 * 1024;

/// Reads a message that another cloud VM may have left in the pool (a rendezvous request
/// or answer): only a regular file, not through a symlink, without blocking on a FIFO, and
/// at most [`MAX_MESSAGE_LEN`] bytes (a longer one is an error, not read whole).
/// [`PoolError::Missing`] when there is none.
pub fn read_message(path: &Path) -> Result<Vec<u8>, PoolError> {
    let (file, _) = open_regular(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_MESSAGE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err("read", path))?;
    if bytes.len() as u64 > MAX_MESSAGE_LEN {
        return Err(io_err("read", path)(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("longer than {MAX_MESSAGE_LEN} bytes"),
        )));
    }
    Ok(bytes)
}

/// Opens `path` for reading, refusing symlinks and non-regular files; the check is made on
/// the opened file, so the path cannot be swapped in between.
fn open_regular(path: &Path) -> Result<(File, fs::Metadata), PoolError> {
    let before = fs::symlink_metadata(path).map_err(|e| not_found_or(e, "stat", path))?;
    if !before.file_type().is_file() {
        return Err(PoolError::NotRegular(path.to_path_buf()));
    }
    // The pool is shared: between the check above and the open, the name can be swapped for a
    // symlink (the open must not follow it) or a FIFO (whose open would block until a writer
    // comes: O_NONBLOCK). Either is then refused below, on the opened file.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => PoolError::NotRegular(path.to_path_buf()),
            _ => not_found_or(e, "open", path),
        })?;
    let meta = file.metadata().map_err(io_err("stat", path))?;
    if !meta.file_type().is_file()
        || FileIdentity::from_metadata(&meta) != FileIdentity::from_metadata(&before)
    {
        return Err(PoolError::NotRegular(path.to_path_buf()));
    }
    Ok((file, meta))
}

/// A beam pool directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeamPool {
    dir: PathBuf,
}

impl BeamPool {
    /// A pool at `dir` (not touched until used).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The pool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of pool file `file_name`, refusing anything but a plain file name.
    pub fn path_of(&self, file_name: &str) -> Result<PathBuf, PoolError> {
        if !is_plain_file_name(file_name) {
            return Err(PoolError::BadName(file_name.to_owned()));
        }
        Ok(self.dir.join(file_name))
    }

    // The pool file's name is checked too, not only the name made from it: "" or "." would
    // give `.owner`, `..ran`…, names of no pool file that may be another program's files.
    fn record_path(&self, file_name: &str) -> Result<PathBuf, PoolError> {
        self.path_of(file_name)?;
        self.path_of(&format!("{file_name}{OWNER_SUFFIX}"))
    }

    fn ran_path(&self, file_name: &str) -> Result<PathBuf, PoolError> {
        self.path_of(file_name)?;
        self.path_of(&format!("{file_name}{RAN_SUFFIX}"))
    }

    /// Destination of a zero-copy migration, once the guest runs there on `file_name`'s
    /// memory: leaves the marker `<file_name>.ran`. From then on the source must never run
    /// the guest again: its failure path sees the marker ([`BeamPool::has_ran`]) and fences
    /// the source instead of resuming it.
    pub fn mark_ran(&self, file_name: &str) -> Result<(), PoolError> {
        let path = self.ran_path(file_name)?;
        // Not `fs::write`: the pool is shared, and whatever already sits at the marker's name
        // (a symlink to a file elsewhere, a hard link to another's file) would be followed and
        // truncated, and the marker would get the umask's mode. The marker is written to a
        // new private file (0600; `create_new` never follows a symlink) and renamed over
        // whatever is there, as the owner records are.
        let tmp = self.temp_path(&format!("{file_name}{RAN_SUFFIX}"));
        let result = create_private(&tmp).and_then(|mut f| {
            f.write_all(b"ran\n").map_err(io_err("write", &tmp))?;
            fs::rename(&tmp, &path).map_err(io_err("rename", &path))
        });
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// A fresh, unguessable name for a temporary file that will become `name` (classified
    /// [`PoolFileKind::Temporary`]).
    fn temp_path(&self, name: &str) -> PathBuf {
        let mut rnd = [0u8; 8];
        rand::rngs::OsRng.fill_bytes(&mut rnd);
        self.dir
            .join(format!(".{name}.{}{TMP_SUFFIX}", hex::encode(rnd)))
    }

    /// Whether the destination left the marker of [`BeamPool::mark_ran`] for `file_name`.
    /// Anything at that name counts. An error means the pool could not say (the caller
    /// decides; the source's failure path fences on it).
    pub fn has_ran(&self, file_name: &str) -> Result<bool, PoolError> {
        let path = self.ran_path(file_name)?;
        match fs::symlink_metadata(&path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("stat", &path)(e)),
        }
    }

    /// Deletes the marker of [`BeamPool::mark_ran`] for `file_name` (by the source once its
    /// migration settled, by the owner when it releases the file). A missing marker is not
    /// an error.
    pub fn clear_ran(&self, file_name: &str) -> Result<(), PoolError> {
        let path = self.ran_path(file_name)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &path)(e)),
        }
    }

    /// Creates the pool file for `uuid` at `generation`, `size_bytes` long, mode 0600 and,
    /// when `chown` is given, owned by that (uid, gid) (QEMU's user must open it
    /// read-write). Only the length is set: no page is written, so the file stays sparse.
    /// Fails with [`PoolError::Exists`] if the file exists.
    pub fn create_file(
        &self,
        uuid: &DomainUuid,
        generation: u64,
        size_bytes: u64,
        chown: Option<(u32, u32)>,
    ) -> Result<PathBuf, PoolError> {
        if size_bytes == 0 {
            return Err(PoolError::ZeroSize);
        }
        let path = self.path_of(&pool_file_name(uuid, generation))?;
        let file = create_private(&path)?;
        let sized = file.set_len(size_bytes).map_err(io_err("size", &path));
        let owned = sized.and_then(|()| match chown {
            Some((uid, gid)) => std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
                .map_err(io_err("chown", &path)),
            None => Ok(()),
        });
        if let Err(e) = owned {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        Ok(path)
    }

    /// Checks that pool file `file_name` exists, is a regular file and holds exactly
    /// `expected_size` bytes; returns its identity.
    pub fn check_file(
        &self,
        file_name: &str,
        expected_size: u64,
    ) -> Result<FileIdentity, PoolError> {
        let path = self.path_of(file_name)?;
        let (_, meta) = open_regular(&path)?;
        if meta.len() != expected_size {
            return Err(PoolError::WrongSize {
                path,
                found: meta.len(),
                expected: expected_size,
            });
        }
        Ok(FileIdentity::from_metadata(&meta))
    }

    /// Reads the ownership record of `file_name`; `Ok(None)` when there is none.
    pub fn read_owner(&self, file_name: &str) -> Result<Option<OwnerRecord>, PoolError> {
        let path = self.record_path(file_name)?;
        let (file, _) = match open_regular(&path) {
            Ok(opened) => opened,
            Err(PoolError::Missing(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut text = Vec::new();
        // One byte past the cap tells a record at the cap from a longer one, which is corrupt:
        // judged on its first 64 KiB alone, it could parse (a record padded with blanks).
        file.take(MAX_RECORD_LEN + 1)
            .read_to_end(&mut text)
            .map_err(io_err("read", &path))?;
        if text.len() as u64 > MAX_RECORD_LEN {
            return Err(PoolError::BadRecord {
                path,
                source: <serde_json::Error as serde::de::Error>::custom(format_args!(
                    "longer than {MAX_RECORD_LEN} bytes"
                )),
            });
        }
        let record: OwnerRecord =
            serde_json::from_slice(&text).map_err(|source| PoolError::BadRecord {
                path: path.clone(),
                source,
            })?;
        let consistent = record.pool_file == file_name
            && (record.state == OwnerState::HandingOver) == record.handing_over_to.is_some();
        if !consistent {
            return Err(PoolError::RecordMismatch(path));
        }
        Ok(Some(record))
    }

    /// Claims `file_name` for `host`: writes an `active` record, failing with
    /// [`PoolError::Exists`] if any record exists (exclusive, atomic).
    pub fn claim(
        &self,
        file_name: &str,
        uuid: &DomainUuid,
        generation: u64,
        host: &HostId,
    ) -> Result<OwnerRecord, PoolError> {
        let record = OwnerRecord {
            owner: host.clone(),
            domain_uuid: uuid.clone(),
            generation,
            pool_file: file_name.to_owned(),
            state: OwnerState::Active,
            handing_over_to: None,
        };
        self.write_record(&record, true)?;
        Ok(record)
    }

    /// `active` → `handing-over` to `to`, by the owner `from`, when a zero-copy migration
    /// starts.
    pub fn begin_hand_over(
        &self,
        file_name: &str,
        from: &HostId,
        to: &HostId,
    ) -> Result<OwnerRecord, PoolError> {
        let mut record = self.owned_record(file_name, from, OwnerState::Active)?;
        record.state = OwnerState::HandingOver;
        record.handing_over_to = Some(to.clone());
        self.write_record(&record, false)?;
        Ok(record)
    }

    /// `handing-over` → `active` with `to` as owner and the generation bumped to
    /// `generation`, by the old owner `from`, once libvirt reported success.
    pub fn complete_hand_over(
        &self,
        file_name: &str,
        from: &HostId,
        to: &HostId,
        generation: u64,
    ) -> Result<OwnerRecord, PoolError> {
        let mut record = self.owned_record(file_name, from, OwnerState::HandingOver)?;
        self.check_recipient(file_name, &record, to)?;
        record.owner = to.clone();
        record.generation = generation;
        record.state = OwnerState::Active;
        record.handing_over_to = None;
        self.write_record(&record, false)?;
        Ok(record)
    }

    /// `handing-over` → `active` with the owner unchanged, when the migration failed.
    pub fn abort_hand_over(
        &self,
        file_name: &str,
        from: &HostId,
    ) -> Result<OwnerRecord, PoolError> {
        let mut record = self.owned_record(file_name, from, OwnerState::HandingOver)?;
        record.state = OwnerState::Active;
        record.handing_over_to = None;
        self.write_record(&record, false)?;
        Ok(record)
    }

    /// Releases `file_name` when its domain stops for good on `owner`: marks the record
    /// `released`, deletes the pool file, then the record. A record already `released`
    /// (an interrupted earlier release) is finished off.
    pub fn release(&self, file_name: &str, owner: &HostId) -> Result<(), PoolError> {
        let path = self.path_of(file_name)?;
        let mut record = self.read_owner(file_name)?.ok_or_else(|| {
            PoolError::Missing(self.dir.join(format!("{file_name}{OWNER_SUFFIX}")))
        })?;
        self.check_owner(file_name, &record, owner)?;
        match record.state {
            OwnerState::Active => {
                record.state = OwnerState::Released;
                self.write_record(&record, false)?;
            }
            OwnerState::Released => {}
            OwnerState::HandingOver => {
                return Err(PoolError::WrongState {
                    path,
                    found: record.state,
                    expected: OwnerState::Active,
                })
            }
        }
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &path)(e)),
        }
        let record_path = self.record_path(file_name)?;
        fs::remove_file(&record_path).map_err(io_err("remove", &record_path))
    }

    fn owned_record(
        &self,
        file_name: &str,
        host: &HostId,
        state: OwnerState,
    ) -> Result<OwnerRecord, PoolError> {
        let record_path = self.record_path(file_name)?;
        let record = self
            .read_owner(file_name)?
            .ok_or(PoolError::Missing(record_path))?;
        self.check_owner(file_name, &record, host)?;
        if record.state != state {
            return Err(PoolError::WrongState {
                path: self.dir.join(file_name),
                found: record.state,
                expected: state,
            });
        }
        Ok(record)
    }

    fn check_owner(
        &self,
        file_name: &str,
        record: &OwnerRecord,
        host: &HostId,
    ) -> Result<(), PoolError> {
        if &record.owner != host {
            return Err(PoolError::NotOwner {
                path: self.dir.join(file_name),
                owner: record.owner.clone(),
                host: host.clone(),
            });
        }
        Ok(())
    }

    fn check_recipient(
        &self,
        file_name: &str,
        record: &OwnerRecord,
        to: &HostId,
    ) -> Result<(), PoolError> {
        match &record.handing_over_to {
            Some(recorded) if recorded == to => Ok(()),
            Some(recorded) => Err(PoolError::WrongRecipient {
                path: self.dir.join(file_name),
                to: recorded.clone(),
                expected: to.clone(),
            }),
            None => Err(PoolError::RecordMismatch(self.dir.join(file_name))),
        }
    }

    /// Writes `record` next to its pool file: to a temporary file first, then linked into
    /// place (`exclusive`: fails if a record exists) or renamed over the old one.
    fn write_record(&self, record: &OwnerRecord, exclusive: bool) -> Result<(), PoolError> {
        let target = self.record_path(&record.pool_file)?;
        let tmp = self.temp_path(&format!("{}{OWNER_SUFFIX}", record.pool_file));
        let json = serde_json::to_vec_pretty(record).map_err(|source| PoolError::BadRecord {
            path: target.clone(),
            source,
        })?;
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io_err("create", &tmp))?;
            f.write_all(&json)
                .and_then(|()| f.write_all(b"\n"))
                .and_then(|()| f.sync_all())
                .map_err(io_err("write", &tmp))?;
            if exclusive {
                fs::hard_link(&tmp, &target).map_err(|e| {
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        PoolError::Exists(target.clone())
                    } else {
                        io_err("link", &target)(e)
                    }
                })
            } else {
                fs::rename(&tmp, &target).map_err(io_err("rename", &target))
            }
        })();
        let _ = fs::remove_file(&tmp);
        result
    }

    /// Every pool file in the pool, and every record whose pool file is gone, sorted by
    /// name. Other files (proofs, temporary files, foreign files) are not listed.
    pub fn list(&self) -> Result<Vec<PoolEntry>, PoolError> {
        let mut names: Vec<String> = Vec::new();
        let dir = fs::read_dir(&self.dir).map_err(|e| not_found_or(e, "list", &self.dir))?;
        for entry in dir {
            let entry = entry.map_err(io_err("list", &self.dir))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let file_name = name.strip_suffix(OWNER_SUFFIX).unwrap_or(&name);
            if parse_pool_file_name(file_name).is_some() && !names.iter().any(|n| n == file_name) {
                names.push(file_name.to_owned());
            }
        }
        names.sort();
        let mut entries = Vec::with_capacity(names.len());
        for file_name in names {
            let Some((domain_uuid, generation)) = parse_pool_file_name(&file_name) else {
                continue;
            };
            let path = self.dir.join(&file_name);
            let size = match fs::symlink_metadata(&path) {
                Ok(meta) => Some(meta.len()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(io_err("stat", &path)(e)),
            };
            let record = match self.read_owner(&file_name) {
                Ok(None) => RecordStatus::Missing,
                Ok(Some(r)) => RecordStatus::Valid(r),
                Err(
                    e @ (PoolError::BadRecord { .. }
                    | PoolError::RecordMismatch(_)
                    | PoolError::NotRegular(_)),
                ) => RecordStatus::Corrupt(e.to_string()),
                Err(e) => return Err(e),
            };
            entries.push(PoolEntry {
                file_name,
                domain_uuid,
                generation,
                size,
                record,
            });
        }
        Ok(entries)
    }

    /// Pool files `host` owns but should not keep: records naming `host` as owner whose
    /// domain is not in `live_domains` (the domains this host's libvirt knows), and records
    /// `host` left `released`. Files in `handing-over` are never orphans: the destination may
    /// be running on them; they need the migration's outcome.
    pub fn orphans(
        &self,
        host: &HostId,
        live_domains: &HashSet<DomainUuid>,
    ) -> Result<Vec<PoolEntry>, PoolError> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|e| match &e.record {
                RecordStatus::Valid(r) if &r.owner == host => match r.state {
                    OwnerState::Released => true,
                    OwnerState::Active => !live_domains.contains(&r.domain_uuid),
                    OwnerState::HandingOver => false,
                },
                _ => false,
            })
            .collect())
    }

    /// Files in the pool that no protocol needs any more, older than `min_age`: proofs,
    /// rendezvous requests and answers, temporary files, and `.ran` markers whose pool file
    /// is not being handed over. Such files are left by crashed processes; a younger one may
    /// belong to a migration in flight on any cloud VM sharing the pool. Pool files and owner
    /// records are never leftovers: their owner settles them ([`BeamPool::orphans`]).
    /// Foreign files are not VMBeam's and are not listed. For the caller to report or delete.
    pub fn leftovers(&self, min_age: std::time::Duration) -> Result<Vec<PathBuf>, PoolError> {
        let dir = fs::read_dir(&self.dir).map_err(|e| not_found_or(e, "list", &self.dir))?;
        let mut out = Vec::new();
        for entry in dir {
            let entry = entry.map_err(io_err("list", &self.dir))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let stale = match classify(&name) {
                PoolFileKind::Proof
                | PoolFileKind::RendezvousRequest
                | PoolFileKind::RendezvousResponse
                | PoolFileKind::Temporary => true,
                PoolFileKind::RanMarker => {
                    let file = name.strip_suffix(RAN_SUFFIX).unwrap_or_default();
                    match self.read_owner(file) {
                        Ok(Some(r)) => r.state != OwnerState::HandingOver,
                        Ok(None) => true,
                        // An unreadable record: not ours to judge here (see `list`).
                        Err(_) => false,
                    }
                }
                PoolFileKind::Ram | PoolFileKind::OwnerRecord | PoolFileKind::Foreign => false,
            };
            if !stale {
                continue;
            }
            let age = entry
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok())
                .unwrap_or_default();
            if age >= min_age {
                out.push(entry.path());
            }
        }
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    const UUID: &str = "6e3b1e9a-1b2c-4d5e-8f90-0123456789ab";

    fn uuid() -> DomainUuid {
        DomainUuid::new(UUID).unwrap()
    }
    fn host(s: &str) -> HostId {
        HostId::new(s).unwrap()
    }

    #[test]
    fn names() {
        let name = pool_file_name(&uuid(), 3);
        assert_eq!(name, format!("{UUID}.3.ram"));
        assert_eq!(parse_pool_file_name(&name), Some((uuid(), 3)));
        for bad in [
            "x.ram",
            &format!("{UUID}.ram"),
            &format!("{UUID}.-1.ram"),
            &format!("{UUID}.3.ram.owner"),
            &format!("{UUID}.3"),
        ] {
            assert_eq!(parse_pool_file_name(bad), None, "{bad}");
        }
        assert!(is_plain_file_name("a.ram"));
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            assert!(!is_plain_file_name(bad));
        }
        let pool = BeamPool::new("/pool");
        assert!(matches!(pool.path_of("../x"), Err(PoolError::BadName(_))));
    }

    #[test]
    fn creates_sparse_full_size_file() {
        let dir = tempfile::tempdir().unwrap();
        let pool = BeamPool::new(dir.path());
        let size = 1u64 << 30;
        let path = pool.create_file(&uuid(), 1, size, None).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), size);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // Sparse: (almost) no blocks allocated for a 1 GiB file.
        assert!(meta.blocks() * 512 < 1 << 20, "{} blocks", meta.blocks());
        assert!(matches!(
            pool.create_file(&uuid(), 1, size, None),
            Err(PoolError::Exists(_))
        ));
        assert!(matches!(
            pool.create_file(&uuid(), 2, 0, None),
            Err(PoolError::ZeroSize)
        ));
        let id = pool.check_file(&pool_file_name(&uuid(), 1), size).unwrap();
        assert_eq!(id, file_identity(&path).unwrap());
        assert!(matches!(
            pool.check_file(&pool_file_name(&uuid(), 1), size + 1),
            Err(PoolError::WrongSize { .. })
        ));
        assert!(matches!(
            pool.check_file(&pool_file_name(&uuid(), 9), size),
            Err(PoolError::Missing(_))
        ));
        // A symlink is not accepted as a pool file.
        let link = dir.path().join(pool_file_name(&uuid(), 5));
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(matches!(
            pool.check_file(&pool_file_name(&uuid(), 5), size),
            Err(PoolError::NotRegular(_))
        ));
        // But file_identity follows links, as QEMU does.
        assert_eq!(file_identity(&link).unwrap(), id);
        // Creating in a missing directory is an I/O error, not a panic.
        let missing = BeamPool::new(dir.path().join("nope"));
        assert!(matches!(
            missing.create_file(&uuid(), 1, 1, None),
            Err(PoolError::Io { op: "create", .. })
        ));
    }

    #[test]
    fn ownership_lifecycle() {
        let dir = tempfile::tempdir().unwrap();
        let pool = BeamPool::new(dir.path());
        let name = pool_file_name(&uuid(), 1);
        pool.create_file(&uuid(), 1, 4096, None).unwrap();
        assert_eq!(pool.read_owner(&name).unwrap(), None);
        let (a, b, c) = (host("cvm1"), host("cvm2"), host("cvm3"));

        let r = pool.claim(&name, &uuid(), 1, &a).unwrap();
        assert_eq!(r.state, OwnerState::Active);
        assert_eq!(pool.read_owner(&name).unwrap(), Some(r));
        // Owner records are the owner's alone, like the pool files (the pool is shared).
        let rec = fs::metadata(pool.record_path(&name).unwrap()).unwrap();
        assert_eq!(rec.permissions().mode() & 0o777, 0o600);
        assert!(matches!(
            pool.claim(&name, &uuid(), 1, &b),
            Err(PoolError::Exists(_))
        ));

        // Only the owner can hand over, only from active.
        assert!(matches!(
            pool.begin_hand_over(&name, &b, &c),
            Err(PoolError::NotOwner { .. })
        ));
        assert!(matches!(
            pool.complete_hand_over(&name, &a, &b, 2),
            Err(PoolError::WrongState { .. })
        ));
        let r = pool.begin_hand_over(&name, &a, &b).unwrap();
        assert_eq!(r.state, OwnerState::HandingOver);
        assert_eq!(r.handing_over_to, Some(b.clone()));
        // Not releasable while handing over.
        assert!(matches!(
            pool.release(&name, &a),
            Err(PoolError::WrongState { .. })
        ));
        // Abort returns to active under the same owner.
        let r = pool.abort_hand_over(&name, &a).unwrap();
        assert_eq!((r.state, &r.owner), (OwnerState::Active, &a));

        pool.begin_hand_over(&name, &a, &b).unwrap();
        assert!(matches!(
            pool.complete_hand_over(&name, &a, &c, 2),
            Err(PoolError::WrongRecipient { .. })
        ));
        let r = pool.complete_hand_over(&name, &a, &b, 2).unwrap();
        assert_eq!(r.owner, b);
        assert_eq!(r.generation, 2);
        assert_eq!(r.state, OwnerState::Active);
        assert_eq!(pool.read_owner(&name).unwrap(), Some(r));

        // The old owner can no longer release it; the new one can.
        assert!(matches!(
            pool.release(&name, &a),
            Err(PoolError::NotOwner { .. })
        ));
        pool.release(&name, &b).unwrap();
        assert!(fs::read_dir(dir.path()).unwrap().next().is_none());
        assert!(matches!(
            pool.release(&name, &b),
            Err(PoolError::Missing(_))
        ));
    }

    #[test]
    fn interrupted_release_is_finished() {
        let dir = tempfile::tempdir().unwrap();
        let pool = BeamPool::new(dir.path());
        let name = pool_file_name(&uuid(), 1);
        pool.create_file(&uuid(), 1, 4096, None).unwrap();
        let mut r = pool.claim(&name, &uuid(), 1, &host("cvm1")).unwrap();
        r.state = OwnerState::Released;
        pool.write_record(&r, false).unwrap();
        fs::remove_file(dir.path().join(&name)).unwrap();
        let live = HashSet::from([uuid()]);
        assert_eq!(pool.orphans(&host("cvm1"), &live).unwrap().len(), 1);
        pool.release(&name, &host("cvm1")).unwrap();
        assert!(pool.list().unwrap().is_empty());
    }

    #[test]
    fn corrupt_records() {
        let dir = tempfile::tempdir().unwrap();
        let pool = BeamPool::new(dir.path());
        let name = pool_file_name(&uuid(), 1);
        pool.create_file(&uuid(), 1, 4096, None).unwrap();
        let rec = dir.path().join(format!("{name}.owner"));
        fs::write(&rec, "{not json").unwrap();
        assert!(matches!(
            pool.read_owner(&name),
            Err(PoolError::BadRecord { .. })
        ));
        let other = format!(
            r#"{{"owner":"cvm1","domain_uuid":"{UUID}","generation":1,"pool_file":"other.ram","state":"active"}}"#
        );
        fs::write(&rec, other).unwrap();
        assert!(matches!(
            pool.read_owner(&name),
            Err(PoolError::RecordMismatch(_))
        ));
        let inconsistent = format!(
            r#"{{"owner":"cvm1","domain_uuid":"{UUID}","generation":1,"pool_file":"{name}","state":"handing-over"}}"#
        );
        fs::write(&rec, inconsistent).unwrap();
        assert!(matches!(
            pool.read_owner(&name),
            Err(PoolError::RecordMismatch(_))
        ));
        let list = pool.list().unwrap();
        assert!(matches!(list[0].record, RecordStatus::Corrupt(_)));
    }

    #[test]
    fn listing_and_orphans() {
        let dir = tempfile::tempdir().unwrap();
        let pool = BeamPool::new(dir.path());
        let me = host("cvm1");
        let other = host("cvm2");
        let u =
            |n: u8| DomainUuid::new(&format!("00000000-0000-0000-0000-0000000000{n:02}")).unwrap();
        // 1: mine, live. 2: mine, not live (orphan). 3: other's, not live.
        // 4: mine, handing over, not live (not an orphan). 5: no record.
        // 6: record only, mine, not live (orphan).
        for (n, owner) in [(1, &me), (2, &me), (3, &other), (4, &me), (6, &me)] {
            let name = pool_file_name(&u(n), 1);
            pool.create_file(&u(n), 1, 4096, None).unwrap();
            pool.claim(&name, &u(n), 1, owner).unwrap();
        }
        pool.begin_hand_over(&pool_file_name(&u(4), 1), &me, &other)
            .unwrap();
        pool.create_file(&u(5), 1, 4096, None).unwrap();
        fs::remove_file(dir.path().join(pool_file_name(&u(6), 1))).unwrap();
        fs::write(dir.path().join("README"), "not a pool file").unwrap();

        let list = pool.list().unwrap();
        assert_eq!(list.len(), 6);
        assert_eq!(list[4].record, RecordStatus::Missing);
        assert_eq!(list[5].size, None);
        assert_eq!(list[0].size, Some(4096));

        let live = HashSet::from([u(1)]);
        let orphans: Vec<_> = pool
            .orphans(&me, &live)
            .unwrap()
            .into_iter()
            .map(|e| e.domain_uuid)
            .collect();
        assert_eq!(orphans, vec![u(2), u(6)]);
    }

    #[test]
    fn proof_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let nonce = Nonce::random();
        let token = write_proof(dir.path(), &nonce).unwrap();
        assert_eq!(token.nonce, nonce);
        // The destination sees the same directory (same kernel): proof holds.
        read_proof(dir.path(), &token).unwrap();
        // Token travels as JSON between daemons.
        let json = serde_json::to_string(&token).unwrap();
        let back: ProofToken = serde_json::from_str(&json).unwrap();
        read_proof(dir.path(), &back).unwrap();
        assert_eq!(pool_leftovers(dir.path()), 1);
        assert!(matches!(
            write_proof(dir.path(), &nonce),
            Err(PoolError::Exists(_))
        ));
        remove_proof(dir.path(), &token).unwrap();
        remove_proof(dir.path(), &token).unwrap();
        assert_eq!(pool_leftovers(dir.path()), 0);
    }

    fn pool_leftovers(dir: &Path) -> usize {
        BeamPool::new(dir)
            .leftovers(std::time::Duration::ZERO)
            .unwrap()
            .len()
    }

    #[test]
    fn proof_failures() {
        let source = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let token = write_proof(source.path(), &Nonce::random()).unwrap();
        // A destination that does not share the pool cannot see the file.
        assert!(matches!(
            read_proof(elsewhere.path(), &token),
            Err(PoolError::ProofMissing(_))
        ));
        // A destination that makes up a file of that name has the wrong content.
        fs::write(elsewhere.path().join(token.file_name()), "guess").unwrap();
        assert!(matches!(
            read_proof(elsewhere.path(), &token),
            Err(PoolError::ProofMismatch(_))
        ));
        // Same content copied elsewhere: the content matches but it is another file.
        fs::copy(
            source.path().join(token.file_name()),
            elsewhere.path().join(token.file_name()),
        )
        .unwrap();
        assert!(matches!(
            read_proof(elsewhere.path(), &token),
            Err(PoolError::ProofIdentityMismatch { .. })
        ));
        // A symlink to the real file is refused.
        let linked = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(
            source.path().join(token.file_name()),
            linked.path().join(token.file_name()),
        )
        .unwrap();
        assert!(matches!(
            read_proof(linked.path(), &token),
            Err(PoolError::NotRegular(_))
        ));
    }

    #[test]
    fn every_name_in_the_pool_is_classified() {
        let n = Nonce([0xab; 16]);
        let file = pool_file_name(&uuid(), 3);
        for (name, kind) in [
            (file.clone(), PoolFileKind::Ram),
            (format!("{file}.owner"), PoolFileKind::OwnerRecord),
            (format!("{file}.ran"), PoolFileKind::RanMarker),
            (format!("{n}.proof"), PoolFileKind::Proof),
            (format!("{n}.rdv-req"), PoolFileKind::RendezvousRequest),
            (format!("{n}.rdv-resp"), PoolFileKind::RendezvousResponse),
            (format!(".{file}.owner.0011.tmp"), PoolFileKind::Temporary),
            (format!(".{n}.rdv-resp.tmp"), PoolFileKind::Temporary),
            ("README".into(), PoolFileKind::Foreign),
            ("notanonce.proof".into(), PoolFileKind::Foreign),
            ("x.ram.ran".into(), PoolFileKind::Foreign),
            (format!("{n}.ran"), PoolFileKind::Foreign),
            (".tmp".into(), PoolFileKind::Temporary),
            (".".into(), PoolFileKind::Foreign),
        ] {
            assert_eq!(classify(&name), kind, "{name}");
        }
    }

    #[test]
    fn ran_marker() {
        let dir = tempfile::tempdir().unwrap();
        let pool = BeamPool::new(dir.path());
        let name = pool_file_name(&uuid(), 1);
        assert!(!pool.has_ran(&name).unwrap());
        pool.clear_ran(&name).unwrap();
        pool.mark_ran(&name).unwrap();
        assert!(pool.has_ran(&name).unwrap());
        assert!(dir.path().join(format!("{name}.ran")).is_file());
        // Marking twice is fine (the watcher may run again after a daemon restart).
        pool.mark_ran(&name).unwrap();
        pool.clear_ran(&name).unwrap();
        assert!(!pool.has_ran(&name).unwrap());
        assert!(matches!(pool.mark_ran("../x"), Err(PoolError::BadName(_))));
        assert!(matches!(pool.has_ran("a/b"), Err(PoolError::BadName(_))));
        // A pool the source cannot read says neither yes nor no.
        let gone = BeamPool::new(dir.path().join("missing").join("deeper"));
        assert!(gone.mark_ran(&name).is_err());
        assert!(
            !gone.has_ran(&name).unwrap(),
            "a missing pool has no marker"
        );
    }

    #[test]
    fn leftovers_found() {
        let dir = tempfile::tempdir().unwrap();
        let pool = BeamPool::new(dir.path());
        let n = Nonce::random();
        let (a, b) = (host("cvm1"), host("cvm2"));
        fs::write(dir.path().join(".x.owner.00.tmp"), "").unwrap();
        fs::write(dir.path().join("notanonce.proof"), "").unwrap();
        fs::write(dir.path().join(format!("{n}.rdv-req")), "").unwrap();
        fs::write(dir.path().join(format!("{n}.rdv-resp")), "").unwrap();
        fs::write(dir.path().join("README"), "").unwrap();
        // 1: marker while handing over (in flight: not a leftover); 2: marker of an active
        // file (settled: leftover); 3: marker without a pool file (leftover).
        let u =
            |n: u8| DomainUuid::new(&format!("00000000-0000-0000-0000-0000000000{n:02}")).unwrap();
        for g in [1, 2] {
            let name = pool_file_name(&u(g), 1);
            pool.create_file(&u(g), 1, 10, None).unwrap();
            pool.claim(&name, &u(g), 1, &a).unwrap();
            pool.mark_ran(&name).unwrap();
        }
        pool.begin_hand_over(&pool_file_name(&u(1), 1), &a, &b)
            .unwrap();
        pool.mark_ran(&pool_file_name(&u(3), 1)).unwrap();
        let names: Vec<String> = pool
            .leftovers(std::time::Duration::ZERO)
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
            .collect();
        let mut expected = vec![
            ".x.owner.00.tmp".to_string(),
            format!("{n}.rdv-req"),
            format!("{n}.rdv-resp"),
            format!("{}.ran", pool_file_name(&u(2), 1)),
            format!("{}.ran", pool_file_name(&u(3), 1)),
        ];
        expected.sort();
        assert_eq!(names, expected);
        // Young files may belong to a migration in flight elsewhere.
        assert!(pool
            .leftovers(std::time::Duration::from_secs(3600))
            .unwrap()
            .is_empty());
    }
}

#[cfg(test)]
mod prop_tests {
    use proptest::prelude::*;

    use super::*;
    use crate::proptest_support::{mutate, proptest_config};

    const UUID: &str = "6e3b1e9a-1b2c-4d5e-8f90-0123456789ab";

    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[./a-f0-9-]{0,12}\\.(tmp|proof|rdv-req|rdv-resp|ram|owner|ran)",
            "\\.[./a-z]{0,6}\\.tmp",
            (
                any::<[u8; 16]>(),
                "(|/|\\.\\./|\\./|x/)",
                "\\.(proof|rdv-req|rdv-resp)"
            )
                .prop_map(|(n, pre, suf)| format!("{pre}{}{suf}", Nonce(n))),
            (any::<u64>(), "(|/|\\.\\./|\\./|x/)", "(|\\.owner|\\.ran)")
                .prop_map(|(g, pre, suf)| format!("{pre}{UUID}.{g}.ram{suf}")),
        ]
    }

    fn record_json() -> impl Strategy<Value = Vec<u8>> {
        (
            any::<u64>(),
            prop_oneof![
                Just("active"),
                Just("handing-over"),
                Just("released"),
                Just("x")
            ],
            proptest::option::of("[a-z0-9]{1,8}"),
        )
            .prop_map(|(generation, state, to)| {
                let mut v = serde_json::json!({
                    "owner": "cvm1",
                    "domain_uuid": UUID,
                    "generation": generation,
                    "pool_file": format!("{UUID}.1.ram"),
                    "state": state,
                });
                if let Some(to) = to {
                    v["handing_over_to"] = to.into();
                }
                serde_json::to_vec(&v).unwrap()
            })
    }

    /// Regression (found by `prop_pool_classify_never_claims_an_escaping_name`): a name
    /// with a directory part was classified as one of VMBeam's temporary files.
    #[test]
    fn classify_refuses_names_outside_the_pool() {
        for name in ["./.tmp", "../x.tmp", "./../.owner.tmp", ".a/b.tmp"] {
            assert_eq!(classify(name), PoolFileKind::Foreign, "{name}");
        }
        assert_eq!(classify(".x.tmp"), PoolFileKind::Temporary);
    }

    proptest! {
        #![proptest_config(proptest_config())]

        #[test]
        fn prop_pool_classify_never_claims_an_escaping_name(name in name()) {
            let kind = classify(&name);
            if kind != PoolFileKind::Foreign {
                prop_assert!(is_plain_file_name(&name), "{:?} classified {:?}", name, kind);
            }
            if let Some((uuid, generation)) = parse_pool_file_name(&name) {
                prop_assert_eq!(pool_file_name(&uuid, generation), name);
            }
        }

        #[test]
        fn prop_pool_read_owner_of_arbitrary_content(
            content in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..300),
                record_json(),
                (record_json(), any::<u8>(), any::<prop::sample::Index>(), any::<u8>())
                    .prop_map(|(j, mode, pos, b)| mutate(j, mode, pos, b)),
            ],
        ) {
            let dir = tempfile::tempdir().unwrap();
            let pool = BeamPool::new(dir.path());
            let file = format!("{UUID}.1.ram");
            fs::write(dir.path().join(format!("{file}{OWNER_SUFFIX}")), &content).unwrap();
            if let Ok(Some(record)) = pool.read_owner(&file) {
                prop_assert_eq!(&record.pool_file, &file);
                prop_assert_eq!(
                    record.state == OwnerState::HandingOver,
                    record.handing_over_to.is_some()
                );
            }
        }

        #[test]
        fn prop_pool_owner_record_round_trip(generation in any::<u64>(), host in "[a-z0-9][a-z0-9.-]{0,20}") {
            let dir = tempfile::tempdir().unwrap();
            let pool = BeamPool::new(dir.path());
            let file = format!("{UUID}.1.ram");
            let uuid = DomainUuid::new(UUID).unwrap();
            let host = HostId::new(host).unwrap();
            let record = pool.claim(&file, &uuid, generation, &host).unwrap();
            prop_assert_eq!(pool.read_owner(&file).unwrap(), Some(record));
        }
    }
}

#[cfg(test)]
mod hostile_tests {
    //! The pool is shared with other cloud VMs: hostile ground. Whatever sits at a name the
    //! pool code uses (a symlink or a hard link to a file elsewhere, a directory, a FIFO, a
    //! record of any size and content), the pool code never writes, links, truncates or
    //! deletes anything outside the pool, never blocks, and leaves its own files mode 0600.

    use super::*;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    const UUID: &str = "6e3b1e9a-1b2c-4d5e-8f90-0123456789ab";

    fn uuid() -> DomainUuid {
        DomainUuid::new(UUID).unwrap()
    }

    fn host(s: &str) -> HostId {
        HostId::new(s).unwrap()
    }

    /// A file (and its directory) outside the pool, which nothing done in the pool may
    /// change.
    struct Outside {
        dir: tempfile::TempDir,
        file: PathBuf,
        content: Vec<u8>,
        ino: u64,
    }

    impl Outside {
        fn new(content: &[u8]) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("sentinel");
            fs::write(&file, content).unwrap();
            fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
            let ino = fs::metadata(&file).unwrap().ino();
            Outside {
                dir,
                file,
                content: content.to_vec(),
                ino,
            }
        }

        /// Still there, the same file, the same content and mode, and nothing new beside it.
        #[track_caller]
        fn assert_untouched(&self) {
            let meta = fs::symlink_metadata(&self.file).expect("the outside file is gone");
            assert!(meta.is_file(), "the outside file was replaced");
            assert_eq!(meta.ino(), self.ino, "the outside file was replaced");
            assert_eq!(
                meta.mode() & 0o777,
                0o644,
                "the outside file's mode changed"
            );
            assert_eq!(
                fs::read(&self.file).unwrap(),
                self.content,
                "the outside file was written"
            );
            assert_eq!(
                names(self.dir.path()),
                ["sentinel"],
                "a file appeared outside"
            );
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[track_caller]
    fn assert_private_file(path: &Path) {
        let meta = fs::symlink_metadata(path).unwrap();
        assert!(meta.is_file(), "{} is not a regular file", path.display());
        assert_eq!(meta.mode() & 0o777, 0o600, "{}", path.display());
    }

    #[track_caller]
    fn assert_no_temporaries(dir: &Path) {
        let tmp: Vec<String> = names(dir)
            .into_iter()
            .filter(|n| classify(n) == PoolFileKind::Temporary)
            .collect();
        assert!(tmp.is_empty(), "temporary files left behind: {tmp:?}");
    }

    /// Makes a FIFO at `path`.
    fn mkfifo(path: &Path) {
        use std::os::unix::ffi::OsStrExt as _;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c` is a NUL-terminated path that lives across the call.
        let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
        assert_eq!(
            rc,
            0,
            "mkfifo {}: {}",
            path.display(),
            io::Error::last_os_error()
        );
    }

    /// Runs `f` on a thread of its own and fails the test if it has not returned within
    /// 10 s (an open blocked on a FIFO never returns).
    #[track_caller]
    fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("{what}: still blocked after 10 s"))
    }

    /// Sets the flag when dropped (stops a helper thread even when the test fails).
    struct StopOnDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);

    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Regression: `open_regular` checked the name with `lstat` and then opened it with a
    /// plain `open`. A record swapped for a FIFO in between blocked the reader (`read_owner`,
    /// so `list`, `release`, the daemon's hooks) until someone opened the FIFO for writing;
    /// a symlink swapped in was followed. Another cloud VM sharing the pool can do either.
    #[test]
    fn a_record_swapped_for_a_fifo_never_blocks_its_reader() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        use std::time::{Duration, Instant};

        let dir = tempfile::tempdir().unwrap();
        let pool = BeamPool::new(dir.path());
        let name = pool_file_name(&uuid(), 1);
        pool.create_file(&uuid(), 1, 4096, None).unwrap();
        pool.claim(&name, &uuid(), 1, &host("cvm1")).unwrap();
        let record = pool.record_path(&name).unwrap();
        let spare = tempfile::tempdir().unwrap();
        let fifo = spare.path().join("fifo");
        mkfifo(&fifo);
        let regular = spare.path().join("regular");
        fs::copy(&record, &regular).unwrap();

        let stop = Arc::new(AtomicBool::new(false));
        let _stop = StopOnDrop(stop.clone());
        let swapper = {
            let (stop, spare) = (stop.clone(), spare.path().to_path_buf());
            std::thread::spawn(move || {
                let next = spare.join("next");
                while !stop.load(Ordering::SeqCst) {
                    for src in [&fifo, &regular] {
                        let _ = fs::remove_file(&next);
                        // (Errors only once the test is over and its directories are gone.)
                        if fs::hard_link(src, &next).is_err() || fs::rename(&next, &record).is_err()
                        {
                            return;
                        }
                    }
                }
            })
        };
        let (read, refused) = within("read_owner of a record swapped for a FIFO", move || {
            let deadline = Instant::now() + Duration::from_secs(2);
            let (mut read, mut refused) = (0u32, 0u32);
            while Instant::now() < deadline {
                match pool.read_owner(&name) {
                    Ok(Some(_)) => read += 1,
                    Err(PoolError::NotRegular(_)) => refused += 1,
                    other => panic!("{other:?}"),
                }
            }
            (read, refused)
        });
        stop.store(true, Ordering::SeqCst);
        swapper.join().unwrap();
        assert!(read > 0 && refused > 0, "read {read}, refused {refused}");
    }

    /// Every file under `dir` (recursively, symlinks not followed) with its content.
    fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        for name in names(dir) {
            let path = dir.join(name);
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                out.extend(tree(&path));
            } else if meta.is_file() {
                out.push((path.clone(), fs::read(&path).unwrap()));
            } else {
                out.push((path.clone(), Vec::new()));
            }
        }
        out
    }

    /// Regression: only the record's and the marker's names were checked, not the pool
    /// file's name they are made from: "" gave `.owner` and `.ran`, "." gave `..owner`…,
    /// names of no pool file, so `clear_ran("")` deleted another program's `.ran` and
    /// `claim("")` wrote a `.owner`.
    #[test]
    fn every_method_refuses_a_name_that_is_not_a_plain_file_name() {
        let top = tempfile::tempdir().unwrap();
        let pool_dir = top.path().join("pool");
        fs::create_dir(&pool_dir).unwrap();
        // What an escaping name would reach: files beside the pool, and foreign files in it
        // that a name made from an empty or dotted one would hit.
        for n in ["x", "x.owner", "x.ran", "b.owner", "b.ran"] {
            fs::write(top.path().join(n), "beside the pool").unwrap();
        }
        for n in [".owner", ".ran", "..owner", "..ran", "...owner", "...ran"] {
            fs::write(pool_dir.join(n), "not VMBeam's").unwrap();
        }
        let before = tree(top.path());
        let pool = BeamPool::new(&pool_dir);
        let (a, b) = (host("cvm1"), host("cvm2"));
        let absolute = top.path().join("x").to_str().unwrap().to_owned();
        let long = "x".repeat(256);
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "../b",
            "./../x",
            "x/../../x",
            "a/b",
            "/etc/passwd",
            absolute.as_str(),
            "a\0b",
            "x.ram\0",
            long.as_str(),
        ] {
            let is_bad = |r: Result<(), PoolError>| matches!(r, Err(PoolError::BadName(_)));
            let results = [
                ("path_of", is_bad(pool.path_of(bad).map(drop))),
                ("mark_ran", is_bad(pool.mark_ran(bad))),
                ("has_ran", is_bad(pool.has_ran(bad).map(drop))),
                ("clear_ran", is_bad(pool.clear_ran(bad))),
                ("check_file", is_bad(pool.check_file(bad, 4096).map(drop))),
                ("read_owner", is_bad(pool.read_owner(bad).map(drop))),
                ("claim", is_bad(pool.claim(bad, &uuid(), 1, &a).map(drop))),
                (
                    "begin_hand_over",
                    is_bad(pool.begin_hand_over(bad, &a, &b).map(drop)),
                ),
                (
                    "complete_hand_over",
                    is_bad(pool.complete_hand_over(bad, &a, &b, 2).map(drop)),
                ),
                (
                    "abort_hand_over",
                    is_bad(pool.abort_hand_over(bad, &a).map(drop)),
                ),
                ("release", is_bad(pool.release(bad, &a))),
            ];
            for (method, refused) in results {
                assert!(refused, "{method}({bad:?}) was not refused as a bad name");
            }
            assert_eq!(tree(top.path()), before, "after {bad:?}");
        }
    }

    /// What another cloud VM may leave at a name the pool code uses.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Planted {
        SymlinkToFile,
        SymlinkToDir,
        DanglingSymlink,
        HardLink,
        Dir,
        Fifo,
    }

    const PLANTED: [Planted; 6] = [
        Planted::SymlinkToFile,
        Planted::SymlinkToDir,
        Planted::DanglingSymlink,
        Planted::HardLink,
        Planted::Dir,
        Planted::Fifo,
    ];

    /// Leaves `what` at `at`, pointing (where it points) at `outside`.
    fn plant(what: Planted, at: &Path, outside: &Outside) {
        match what {
            Planted::SymlinkToFile => symlink(&outside.file, at).unwrap(),
            Planted::SymlinkToDir => symlink(outside.dir.path(), at).unwrap(),
            Planted::DanglingSymlink => symlink(outside.dir.path().join("created"), at).unwrap(),
            Planted::HardLink => fs::hard_link(&outside.file, at).unwrap(),
            Planted::Dir => {
                fs::create_dir(at).unwrap();
                fs::write(at.join("inner"), "inner").unwrap();
            }
            Planted::Fifo => mkfifo(at),
        }
    }

    fn active_record(name: &str, owner: &HostId) -> OwnerRecord {
        OwnerRecord {
            owner: owner.clone(),
            domain_uuid: uuid(),
            generation: 1,
            pool_file: name.to_owned(),
            state: OwnerState::Active,
            handing_over_to: None,
        }
    }

    #[test]
    fn a_pool_file_that_is_a_link_or_no_file_is_never_written_through() {
        for what in PLANTED {
            within(&format!("pool file: {what:?}"), move || {
                let dir = tempfile::tempdir().unwrap();
                let pool = BeamPool::new(dir.path());
                let me = host("cvm1");
                let outside = Outside::new(b"another guest's memory");
                let name = pool_file_name(&uuid(), 1);
                let path = dir.path().join(&name);
                plant(what, &path, &outside);

                assert!(
                    matches!(
                        pool.create_file(&uuid(), 1, 4096, None),
                        Err(PoolError::Exists(_))
                    ),
                    "{what:?}"
                );
                let checked = pool.check_file(&name, 4096);
                if what == Planted::HardLink {
                    // A regular file, but not the guest's size (nor its file).
                    assert!(
                        matches!(checked, Err(PoolError::WrongSize { .. })),
                        "{checked:?}"
                    );
                } else {
                    assert!(
                        matches!(checked, Err(PoolError::NotRegular(_))),
                        "{what:?}: {checked:?}"
                    );
                }
                let list = pool.list().unwrap();
                assert_eq!((list.len(), &list[0].record), (1, &RecordStatus::Missing));
                outside.assert_untouched();

                // Owned by this host: releasing deletes the name, never what it points at.
                pool.claim(&name, &uuid(), 1, &me).unwrap();
                assert_private_file(&pool.record_path(&name).unwrap());
                let released = pool.release(&name, &me);
                if what == Planted::Dir {
                    assert!(
                        matches!(released, Err(PoolError::Io { op: "remove", .. })),
                        "{released:?}"
                    );
                    assert_eq!(names(&path), ["inner"]);
                } else {
                    released.unwrap();
                    assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
                }
                assert!(pool
                    .leftovers(std::time::Duration::ZERO)
                    .unwrap()
                    .is_empty());
                assert_no_temporaries(dir.path());
                outside.assert_untouched();
            });
        }
    }

    #[test]
    fn an_owner_record_that_is_a_link_or_no_file_is_never_followed_or_written_through() {
        for what in PLANTED {
            within(&format!("owner record: {what:?}"), move || {
                let dir = tempfile::tempdir().unwrap();
                let pool = BeamPool::new(dir.path());
                let (me, other) = (host("cvm1"), host("cvm2"));
                let name = pool_file_name(&uuid(), 1);
                pool.create_file(&uuid(), 1, 4096, None).unwrap();
                // Followed, the link would give a valid record naming this host.
                let record = active_record(&name, &me);
                let outside = Outside::new(&serde_json::to_vec(&record).unwrap());
                let rec = pool.record_path(&name).unwrap();
                plant(what, &rec, &outside);
                let hard = what == Planted::HardLink;

                let read = pool.read_owner(&name);
                if hard {
                    assert_eq!(read.unwrap(), Some(record.clone()));
                } else {
                    assert!(
                        matches!(read, Err(PoolError::NotRegular(_))),
                        "{what:?}: {read:?}"
                    );
                }
                let claimed = pool.claim(&name, &uuid(), 1, &other);
                assert!(
                    matches!(claimed, Err(PoolError::Exists(_))),
                    "{what:?}: {claimed:?}"
                );
                let listed = pool.list().unwrap().remove(0).record;
                if hard {
                    assert_eq!(listed, RecordStatus::Valid(record.clone()));
                } else {
                    assert!(matches!(listed, RecordStatus::Corrupt(_)), "{listed:?}");
                }
                let orphans = pool.orphans(&me, &HashSet::new()).unwrap();
                assert_eq!(orphans.len(), usize::from(hard));
                outside.assert_untouched();

                // The owner's transitions and its release: refused on anything but a regular
                // record; on a hard link, a new record replaces the name and the file
                // outside keeps its content.
                let handed = pool.begin_hand_over(&name, &me, &other);
                if hard {
                    handed.unwrap();
                    assert_private_file(&rec);
                    assert_ne!(fs::metadata(&rec).unwrap().ino(), outside.ino);
                    pool.abort_hand_over(&name, &me).unwrap();
                    fs::remove_file(&rec).unwrap();
                    fs::hard_link(&outside.file, &rec).unwrap();
                } else {
                    assert!(
                        matches!(handed, Err(PoolError::NotRegular(_))),
                        "{handed:?}"
                    );
                }
                outside.assert_untouched();
                let released = pool.release(&name, &me);
                if hard {
                    released.unwrap();
                    assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
                } else {
                    assert!(
                        matches!(released, Err(PoolError::NotRegular(_))),
                        "{released:?}"
                    );
                    assert!(dir.path().join(&name).exists(), "released without a record");
                }
                assert_no_temporaries(dir.path());
                outside.assert_untouched();
            });
        }
    }

    #[test]
    fn a_ran_marker_that_is_a_link_or_no_file_is_only_ever_unlinked() {
        for what in PLANTED {
            within(&format!("ran marker: {what:?}"), move || {
                let dir = tempfile::tempdir().unwrap();
                let pool = BeamPool::new(dir.path());
                let outside = Outside::new(b"someone else's file\n");
                let name = pool_file_name(&uuid(), 1);
                let ran = pool.ran_path(&name).unwrap();
                plant(what, &ran, &outside);
                assert!(pool.has_ran(&name).unwrap(), "anything at the name counts");
                // No pool file: a leftover, listed, not deleted.
                assert_eq!(
                    pool.leftovers(std::time::Duration::ZERO).unwrap(),
                    std::slice::from_ref(&ran)
                );
                assert!(fs::symlink_metadata(&ran).is_ok());
                let cleared = pool.clear_ran(&name);
                if what == Planted::Dir {
                    assert!(cleared.is_err());
                    assert_eq!(names(&ran), ["inner"]);
                } else {
                    cleared.unwrap();
                    assert!(!pool.has_ran(&name).unwrap());
                }
                outside.assert_untouched();
            });
        }
    }

    #[test]
    fn a_proof_that_is_a_link_or_no_file_is_never_followed_or_written_through() {
        for what in PLANTED {
            within(&format!("proof: {what:?}"), move || {
                let dir = tempfile::tempdir().unwrap();
                let outside = Outside::new(b"vmbeam-proof-v1\n");
                let nonce = Nonce::random();
                let path = dir.path().join(format!("{nonce}{PROOF_SUFFIX}"));
                plant(what, &path, &outside);
                let written = write_proof(dir.path(), &nonce);
                assert!(
                    matches!(written, Err(PoolError::Exists(_))),
                    "{what:?}: {written:?}"
                );
                // A token whose content matches the file outside; the identity the source
                // reported is not that file's.
                let token = ProofToken {
                    nonce,
                    sha256: hex::encode(Sha256::digest(&outside.content)),
                    identity: FileIdentity { dev: 0, ino: 0 },
                };
                let read = read_proof(dir.path(), &token);
                if what == Planted::HardLink {
                    assert!(
                        matches!(read, Err(PoolError::ProofIdentityMismatch { .. })),
                        "{read:?}"
                    );
                } else {
                    assert!(
                        matches!(read, Err(PoolError::NotRegular(_))),
                        "{what:?}: {read:?}"
                    );
                }
                let removed = remove_proof(dir.path(), &token);
                if what == Planted::Dir {
                    assert!(removed.is_err());
                    assert_eq!(names(&path), ["inner"]);
                } else {
                    removed.unwrap();
                    assert!(names(dir.path()).is_empty());
                }
                outside.assert_untouched();
            });
        }
    }

    /// Links at the temporary names an attacker could guess are neither followed nor
    /// deleted (VMBeam's temporary names are random and created new); they are listed as
    /// leftovers for the operator.
    #[test]
    fn links_at_guessable_temporary_names_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let pool = BeamPool::new(dir.path());
        let (me, other) = (host("cvm1"), host("cvm2"));
        let outside = Outside::new(b"someone else's file\n");
        let name = pool_file_name(&uuid(), 1);
        let mut planted = Vec::new();
        for n in [
            format!(".{name}{OWNER_SUFFIX}{TMP_SUFFIX}"),
            format!(".{name}{OWNER_SUFFIX}.0000000000000000{TMP_SUFFIX}"),
            format!(".{name}{RAN_SUFFIX}{TMP_SUFFIX}"),
            format!(".{name}{RAN_SUFFIX}.0000000000000000{TMP_SUFFIX}"),
        ] {
            let p = dir.path().join(n);
            symlink(&outside.file, &p).unwrap();
            planted.push(p);
        }
        planted.sort();
        pool.create_file(&uuid(), 1, 4096, None).unwrap();
        pool.claim(&name, &uuid(), 1, &me).unwrap();
        pool.begin_hand_over(&name, &me, &other).unwrap();
        pool.mark_ran(&name).unwrap();
        pool.complete_hand_over(&name, &me, &other, 2).unwrap();
        outside.assert_untouched();
        let mut leftovers = pool.leftovers(std::time::Duration::ZERO).unwrap();
        leftovers.retain(|p| {
            classify(p.file_name().unwrap().to_str().unwrap()) == PoolFileKind::Temporary
        });
        assert_eq!(leftovers, planted);
        pool.release(&name, &other).unwrap();
        pool.clear_ran(&name).unwrap();
        for p in &planted {
            assert!(fs::symlink_metadata(p).unwrap().file_type().is_symlink());
        }
        outside.assert_untouched();
    }

    /// Records of any content: typed errors, listed as corrupt, never acted on.
    #[test]
    fn a_malformed_owner_record_is_corrupt_and_never_acted_on() {
        let name = pool_file_name(&uuid(), 1);
        let me = host("cvm1");
        let good = serde_json::to_vec(&active_record(&name, &me)).unwrap();
        let with = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v: serde_json::Value = serde_json::from_slice(&good).unwrap();
            f(&mut v);
            serde_json::to_vec(&v).unwrap()
        };
        let mut non_utf8 = good.clone();
        non_utf8[12] = 0xff;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", Vec::new()),
            ("truncated", good[..good.len() / 2].to_vec()),
            ("truncated by one byte", good[..good.len() - 1].to_vec()),
            ("not UTF-8", non_utf8),
            ("UTF-16", {
                let s = String::from_utf8(good.clone()).unwrap();
                s.encode_utf16().flat_map(u16::to_le_bytes).collect()
            }),
            ("NUL bytes", vec![0; 100]),
            ("null", b"null".to_vec()),
            ("an array", b"[]".to_vec()),
            (
                "deeply nested",
                [vec![b'['; 100_000], vec![b']'; 100_000]].concat(),
            ),
            ("over the cap", {
                let mut v = good.clone();
                v.resize(MAX_RECORD_LEN as usize + 1, b' ');
                v
            }),
            ("two records", [good.clone(), good.clone()].concat()),
            ("an unknown field", with(&|v| v["x"] = 1.into())),
            ("a bad owner", with(&|v| v["owner"] = "../etc".into())),
            (
                "another pool file",
                with(&|v| v["pool_file"] = "../x".into()),
            ),
            (
                "a NUL in the pool file",
                with(&|v| v["pool_file"] = format!("{name}\0").into()),
            ),
            (
                "handing over to nobody",
                with(&|v| v["state"] = "handing-over".into()),
            ),
            (
                "active with a recipient",
                with(&|v| v["handing_over_to"] = "cvm2".into()),
            ),
            ("an unknown state", with(&|v| v["state"] = "gone".into())),
            (
                "a negative generation",
                with(&|v| v["generation"] = (-1).into()),
            ),
        ];
        for (what, content) in cases {
            let dir = tempfile::tempdir().unwrap();
            let pool = BeamPool::new(dir.path());
            pool.create_file(&uuid(), 1, 4096, None).unwrap();
            let rec = pool.record_path(&name).unwrap();
            fs::write(&rec, &content).unwrap();
            pool.mark_ran(&name).unwrap();
            let before = tree(dir.path());

            let read = pool.read_owner(&name);
            assert!(
                matches!(
                    read,
                    Err(PoolError::BadRecord { .. } | PoolError::RecordMismatch(_))
                ),
                "{what}: {read:?}"
            );
            let listed = pool.list().unwrap().remove(0).record;
            assert!(
                matches!(listed, RecordStatus::Corrupt(_)),
                "{what}: {listed:?}"
            );
            assert!(
                pool.orphans(&me, &HashSet::new()).unwrap().is_empty(),
                "{what}"
            );
            // Its marker is not ours to judge as left over.
            assert!(
                pool.leftovers(std::time::Duration::ZERO)
                    .unwrap()
                    .is_empty(),
                "{what}"
            );
            assert!(pool.claim(&name, &uuid(), 1, &me).is_err(), "{what}");
            assert!(
                pool.begin_hand_over(&name, &me, &host("cvm2")).is_err(),
                "{what}"
            );
            assert!(pool.abort_hand_over(&name, &me).is_err(), "{what}");
            assert!(pool.release(&name, &me).is_err(), "{what}");
            assert_eq!(tree(dir.path()), before, "{what}: the pool changed");
        }
    }

    /// Every file VMBeam creates in the pool is its owner's alone (0600), whatever the
    /// umask lets through.
    #[test]
    fn every_file_vmbeam_creates_in_the_pool_is_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let pool = BeamPool::new(dir.path());
        // The check means something only if a plain create is readable by others here.
        let control = dir.path().join("control");
        fs::write(&control, "").unwrap();
        assert_ne!(
            fs::metadata(&control).unwrap().mode() & 0o044,
            0,
            "this test needs a umask that lets a plain create be readable by others (022)"
        );
        fs::remove_file(&control).unwrap();

        let (me, other) = (host("cvm1"), host("cvm2"));
        let name = pool_file_name(&uuid(), 1);
        let file = pool.create_file(&uuid(), 1, 4096, None).unwrap();
        assert_private_file(&file);
        let rec = pool.record_path(&name).unwrap();
        pool.claim(&name, &uuid(), 1, &me).unwrap();
        assert_private_file(&rec);
        pool.begin_hand_over(&name, &me, &other).unwrap();
        assert_private_file(&rec);
        pool.abort_hand_over(&name, &me).unwrap();
        assert_private_file(&rec);
        pool.begin_hand_over(&name, &me, &other).unwrap();
        pool.complete_hand_over(&name, &me, &other, 2).unwrap();
        assert_private_file(&rec);
        pool.mark_ran(&name).unwrap();
        assert_private_file(&pool.ran_path(&name).unwrap());
        let token = write_proof(dir.path(), &Nonce::random()).unwrap();
        assert_private_file(&dir.path().join(token.file_name()));
        assert_no_temporaries(dir.path());
        for n in names(dir.path()) {
            assert_private_file(&dir.path().join(n));
        }
    }

    /// Only root may give a pool file to QEMU's user. As root the file is given and stays
    /// 0600; otherwise the chown fails and no file is left behind.
    #[test]
    fn a_pool_file_given_to_another_user_is_given_or_not_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        let pool = BeamPool::new(dir.path());
        let nobody = (65534, 65534);
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let created = pool.create_file(&uuid(), 1, 4096, Some(nobody));
        if root {
            let path = created.unwrap();
            let meta = fs::metadata(&path).unwrap();
            assert_eq!((meta.uid(), meta.gid()), nobody);
            assert_private_file(&path);
        } else {
            assert!(
                matches!(created, Err(PoolError::Io { op: "chown", .. })),
                "{created:?}"
            );
            assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
        }
    }

    #[test]
    fn read_message_reads_only_a_regular_file_of_at_most_64_kib() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        assert!(matches!(read_message(&path), Err(PoolError::Missing(_))));
        let cap = MAX_MESSAGE_LEN as usize;
        for len in [0, 1, cap] {
            fs::write(&path, vec![b'x'; len]).unwrap();
            assert_eq!(read_message(&path).unwrap().len(), len);
        }
        fs::write(&path, vec![b'x'; cap + 1]).unwrap();
        assert!(matches!(
            read_message(&path),
            Err(PoolError::Io { op: "read", .. })
        ));
        // Huge (sparse): refused without being read whole.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(1 << 40).unwrap();
        let p = path.clone();
        assert!(within("reading a 1 TiB message", move || read_message(&p).is_err()));
        fs::remove_file(&path).unwrap();
        for what in PLANTED {
            let outside = Outside::new(b"{}");
            plant(what, &path, &outside);
            let p = path.clone();
            let read = within(&format!("message: {what:?}"), move || read_message(&p));
            if what == Planted::HardLink {
                assert_eq!(read.unwrap(), b"{}");
            } else {
                assert!(
                    matches!(read, Err(PoolError::NotRegular(_))),
                    "{what:?}: {read:?}"
                );
            }
            outside.assert_untouched();
            if what == Planted::Dir {
                fs::remove_dir_all(&path).unwrap();
            } else {
                fs::remove_file(&path).unwrap();
            }
        }
    }

    /// Regression: a record was read up to the 64 KiB cap and judged on that part alone,
    /// so a record longer than the cap whose head parses (a record padded with blanks, then
    /// anything) was taken as valid.
    #[test]
    fn a_record_over_the_cap_is_corrupt_even_when_its_head_parses() {
        let dir = tempfile::tempdir().unwrap();
        let pool = BeamPool::new(dir.path());
        let name = pool_file_name(&uuid(), 1);
        pool.create_file(&uuid(), 1, 4096, None).unwrap();
        let record = pool.claim(&name, &uuid(), 1, &host("cvm1")).unwrap();
        let path = pool.record_path(&name).unwrap();
        let json = serde_json::to_vec(&record).unwrap();
        let cap = MAX_RECORD_LEN as usize;
        let padded = |len: usize, tail: &[u8]| {
            let mut v = json.clone();
            v.resize(len - tail.len(), b' ');
            v.extend_from_slice(tail);
            v
        };
        // At the cap: a record.
        fs::write(&path, padded(cap, b"\n")).unwrap();
        assert_eq!(pool.read_owner(&name).unwrap(), Some(record.clone()));
        // One byte more, or a tail past the cap that is not JSON: corrupt.
        for content in [padded(cap + 1, b"\n"), padded(cap + 10, b"garbage")] {
            fs::write(&path, &content).unwrap();
            assert!(
                matches!(pool.read_owner(&name), Err(PoolError::BadRecord { .. })),
                "{} bytes",
                content.len()
            );
            assert!(matches!(
                pool.list().unwrap()[0].record,
                RecordStatus::Corrupt(_)
            ));
            assert!(matches!(
                pool.release(&name, &host("cvm1")),
                Err(PoolError::BadRecord { .. })
            ));
            assert!(
                dir.path().join(&name).exists(),
                "released on a corrupt record"
            );
        }
        // A huge (sparse) record is not read whole.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(1 << 40).unwrap();
        let r = within("reading a 1 TiB record", move || {
            matches!(pool.read_owner(&name), Err(PoolError::BadRecord { .. }))
        });
        assert!(r);
    }

    /// Regression: `mark_ran` wrote with `fs::write`, which follows a symlink at the
    /// marker's name (and writes through a hard link), truncating a file outside the pool,
    /// and created the marker with the umask's mode (0644).
    #[test]
    fn mark_ran_replaces_what_sits_at_its_name_and_never_writes_through_it() {
        let dir = tempfile::tempdir().unwrap();
        let pool = BeamPool::new(dir.path());
        let name = pool_file_name(&uuid(), 1);
        let ran = dir.path().join(format!("{name}{RAN_SUFFIX}"));
        let outside = Outside::new(b"someone else's file\n");
        let check_marker = || {
            assert_private_file(&ran);
            assert_eq!(fs::read(&ran).unwrap(), b"ran\n");
            assert!(pool.has_ran(&name).unwrap());
            assert_no_temporaries(dir.path());
            outside.assert_untouched();
        };

        // A fresh marker.
        pool.mark_ran(&name).unwrap();
        check_marker();
        // A symlink to a file outside, to a directory outside, to a name outside.
        for target in [
            outside.file.clone(),
            outside.dir.path().to_path_buf(),
            outside.dir.path().join("created"),
        ] {
            fs::remove_file(&ran).unwrap();
            symlink(&target, &ran).unwrap();
            pool.mark_ran(&name).unwrap();
            check_marker();
        }
        // A hard link to a file outside.
        fs::remove_file(&ran).unwrap();
        fs::hard_link(&outside.file, &ran).unwrap();
        pool.mark_ran(&name).unwrap();
        check_marker();
        assert_ne!(fs::metadata(&ran).unwrap().ino(), outside.ino);
        // A directory: refused and kept as it is, no temporary file left.
        fs::remove_file(&ran).unwrap();
        fs::create_dir(&ran).unwrap();
        fs::write(ran.join("inner"), "x").unwrap();
        assert!(pool.mark_ran(&name).is_err());
        assert_eq!(names(&ran), ["inner"]);
        assert!(pool.has_ran(&name).unwrap(), "anything at the name counts");
        assert_no_temporaries(dir.path());
        outside.assert_untouched();
    }
}
