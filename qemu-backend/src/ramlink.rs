//! The RAM-path link: making the file libvirt tells QEMU to use for guest RAM a symlink to a
//! file of the shared beam pool, and proving that a QEMU really maps that pool file.
//!
//! libvirt 9.0 facts (verified with libvirt 9.0.0's own command-line builder,
//! `virsh domxml-to-native qemu-argv` on an embedded QEMU driver, for a domain with
//! `<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>`):
//! - Without NUMA cells the guest RAM is one backend, id `pc.ram`:
//!   `-object {"qom-type":"memory-backend-file","id":"pc.ram",
//!   "mem-path":"<memory_backing_dir>/libvirt/qemu/<id>-<name>/pc.ram","share":true,
//!   "x-use-canonical-path-for-ramblock-id":false,"size":...}` and
//!   `-machine ...,memory-backend=pc.ram` ([`LIBVIRT_DEFAULT_RAM_FILE`]).
//! - With `<numa>` cells there is one backend and one file per cell, id and file name
//!   `ram-node<N>` ([`libvirt_numa_ram_file`]); every one of them must be linked.
//! - `<id>-<name>` is libvirt's "short name": the domain id, a dash, and the first 20
//!   characters of the name ([`libvirt_short_name`]); the id changes at every start. (The
//!   embedded driver prefixes `qemu-embed-<hash>-`.)
//! - QEMU opens an existing file and keeps its content; a dangling symlink makes it spin
//!   forever (open fails ENOENT, `O_CREAT|O_EXCL` fails EEXIST, retry...). Hence
//!   [`link_ram_path`] refuses a missing target, and a short one.

use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{renameat2, RenameFlags};
use vmbeam_core::FileIdentity;

use crate::qmp::{BackendKind, Memdev};

/// File (and backend id) libvirt 9.0 uses for a guest's RAM when it has no NUMA cells.
pub const LIBVIRT_DEFAULT_RAM_FILE: &str = "pc.ram";

/// libvirt truncates domain names to this many characters in its per-domain directories.
pub const LIBVIRT_SHORT_NAME_MAX: usize = 20;

/// File (and backend id) libvirt 9.0 uses for NUMA cell `cell`'s RAM.
pub fn libvirt_numa_ram_file(cell: u32) -> String {
    format!("ram-node{cell}")
}

/// libvirt's short domain name: `<id>-<first 20 characters of name>`.
pub fn libvirt_short_name(domain_id: i64, name: &str) -> String {
    let short: String = name.chars().take(LIBVIRT_SHORT_NAME_MAX).collect();
    format!("{domain_id}-{short}")
}

/// The per-domain memory directory libvirt's QEMU driver creates (system or session
/// driver): `<memory_backing_dir>/libvirt/qemu/<id>-<short name>`.
pub fn libvirt_domain_memory_dir(memory_backing_dir: &Path, domain_id: i64, name: &str) -> PathBuf {
    memory_backing_dir
        .join("libvirt")
        .join("qemu")
        .join(libvirt_short_name(domain_id, name))
}

/// Errors of the RAM-path link and of backing verification.
#[derive(Debug, thiserror::Error)]
pub enum RamLinkError {
    /// An operating-system error.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The pool file does not exist: linking to it would make QEMU spin forever.
    #[error("pool file {} does not exist (refusing a dangling RAM link)", target.display())]
    TargetMissing {
        /// The pool file.
        target: PathBuf,
    },
    /// The pool file is not a regular file.
    #[error("pool file {} is a {kind}, not a regular file", target.display())]
    TargetNotRegular {
        /// The pool file.
        target: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// The pool file is smaller than the guest RAM.
    #[error("pool file {} has {size} bytes, the guest RAM needs {required}", target.display())]
    TargetTooShort {
        /// The pool file.
        target: PathBuf,
        /// Its size.
        size: u64,
        /// The guest's RAM size.
        required: u64,
    },
    /// A path that must be absolute is not.
    #[error("{what} must be an absolute path, got {}", path.display())]
    NotAbsolute {
        /// Which path.
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// Invalid argument.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The directory that must hold the link does not exist.
    #[error("directory {} for the RAM link does not exist", dir.display())]
    LinkDirMissing {
        /// The directory.
        dir: PathBuf,
    },
    /// Something else already sits where the link must go; it is left alone.
    #[error("{} already exists ({what}); not replacing it", link.display())]
    LinkExists {
        /// The link path.
        link: PathBuf,
        /// What is there (e.g. "a regular file", "a symlink to /x").
        what: String,
    },
    /// The path is not a symlink (for [`remove_ram_link`]).
    #[error("{} is not a symlink; not removing it", path.display())]
    NotASymlink {
        /// The path.
        path: PathBuf,
    },
    /// Two paths are not the same file.
    #[error("{} ({a_id}) and {} ({b_id}) are not the same file", a.display(), b.display())]
    NotSameFile {
        /// First path.
        a: PathBuf,
        /// Its identity.
        a_id: FileIdentity,
        /// Second path.
        b: PathBuf,
        /// Its identity.
        b_id: FileIdentity,
    },
    /// No memory backend with that id.
    #[error("QEMU has no memory backend {id:?} (has: {have:?})")]
    MemdevMissing {
        /// The id looked for.
        id: String,
        /// The ids QEMU reported.
        have: Vec<String>,
    },
    /// The backend is not a file (memfd or anonymous RAM): another QEMU cannot map it.
    #[error("memory backend {id:?} is {kind}, not a shared file: refusing zero-copy")]
    NotFileBacked {
        /// Backend id.
        id: String,
        /// Its kind.
        kind: String,
    },
    /// The backend maps the file privately (`share=off`): guest writes never reach the file.
    #[error("memory backend {id:?} has share={share:?}: refusing zero-copy (private mapping)")]
    NotShared {
        /// Backend id.
        id: String,
        /// What QEMU reported.
        share: Option<bool>,
    },
    /// The backend preallocates (touches every page at start: writes into the shared file).
    #[error("memory backend {id:?} has prealloc=on: its start would touch the shared RAM")]
    Preallocated {
        /// Backend id.
        id: String,
    },
    /// The backend's file path is unknown.
    #[error("memory backend {id:?} reports no usable mem-path")]
    MemPathUnknown {
        /// Backend id.
        id: String,
    },
    /// The backend is larger than the pool file.
    #[error("memory backend {id:?} has {size} bytes but the pool file has {file_size}")]
    BackendLargerThanFile {
        /// Backend id.
        id: String,
        /// Backend size.
        size: u64,
        /// Pool file size.
        file_size: u64,
    },
    /// The process does not map the file shared.
    #[error("process {pid} has no shared mapping of {} ({id}){}", path.display(), if *private_only { "; only a private one" } else { "" })]
    NotMappedShared {
        /// The process.
        pid: u32,
        /// The pool file.
        path: PathBuf,
        /// Its identity.
        id: FileIdentity,
        /// True if a private (copy-on-write) mapping of it was seen.
        private_only: bool,
    },
}

/// The identity of what `path` refers to (symlinks followed).
fn file_id(path: &Path) -> Result<FileIdentity, RamLinkError> {
    FileIdentity::of(path).map_err(|source| RamLinkError::Io {
        op: "stat",
        path: path.to_path_buf(),
        source,
    })
}

/// Proves `a` and `b` (symlinks followed) are the same file by (dev, ino); returns its id.
pub fn verify_same_file(a: &Path, b: &Path) -> Result<FileIdentity, RamLinkError> {
    let a_id = file_id(a)?;
    let b_id = file_id(b)?;
    if a_id != b_id {
        return Err(RamLinkError::NotSameFile {
            a: a.to_path_buf(),
            a_id,
            b: b.to_path_buf(),
            b_id,
        });
    }
    Ok(a_id)
}

/// A RAM-path link made by [`link_ram_path`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamLink {
    /// Where the link is (the path QEMU is given).
    pub link: PathBuf,
    /// The pool file it points to.
    pub target: PathBuf,
    /// The pool file's identity.
    pub file: FileIdentity,
    /// The pool file's size when linked.
    pub size: u64,
    /// False if an identical link was already there (idempotent call).
    pub created: bool,
}

fn kind_of(ft: &fs::FileType) -> &'static str {
    if ft.is_dir() {
        "directory"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_file() {
        "regular file"
    } else {
        "special file"
    }
}

/// Checks that `target` is an existing regular file (symlinks followed) of at least
/// `min_size` bytes; returns its identity and size.
pub fn check_pool_file(target: &Path, min_size: u64) -> Result<(FileIdentity, u64), RamLinkError> {
    if !target.is_absolute() {
        return Err(RamLinkError::NotAbsolute {
            what: "the pool file",
            path: target.to_path_buf(),
        });
    }
    if min_size == 0 {
        return Err(RamLinkError::Invalid("guest RAM size must not be 0".into()));
    }
    let md = match fs::metadata(target) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(RamLinkError::TargetMissing {
                target: target.to_path_buf(),
            })
        }
        Err(source) => {
            return Err(RamLinkError::Io {
                op: "stat",
                path: target.to_path_buf(),
                source,
            })
        }
    };
    if !md.file_type().is_file() {
        return Err(RamLinkError::TargetNotRegular {
            target: target.to_path_buf(),
            kind: kind_of(&md.file_type()),
        });
    }
    if md.len() < min_size {
        return Err(RamLinkError::TargetTooShort {
            target: target.to_path_buf(),
            size: md.len(),
            required: min_size,
        });
    }
    Ok((FileIdentity::from_metadata(&md), md.len()))
}

fn describe_existing(link: &Path) -> String {
    match fs::symlink_metadata(link) {
        Ok(md) if md.file_type().is_symlink() => match fs::read_link(link) {
            Ok(t) => format!("a symlink to {}", t.display()),
            Err(_) => "a symlink".into(),
        },
        Ok(md) => format!("a {}", kind_of(&md.file_type())),
        Err(e) => format!("unreadable: {e}"),
    }
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Makes `link` a symlink to the pool file `target`, atomically.
///
/// Preconditions checked first (nothing is changed if one fails): `target` is absolute,
/// exists, is a regular file of at least `min_size` bytes; `link`'s directory exists.
/// The link is created under a temporary name in the same directory and moved into place
/// with `renameat2(RENAME_NOREPLACE)` (or `link(2)` where the file system lacks it), so
/// the path never exists half-made and an existing entry is never replaced: if `link`
/// already is a symlink to the same file the call succeeds (`created: false`), anything
/// else there is [`RamLinkError::LinkExists`]. Afterwards the directory is synced and the
/// link is checked to resolve to the file that was checked (dev, ino).
pub fn link_ram_path(link: &Path, target: &Path, min_size: u64) -> Result<RamLink, RamLinkError> {
    let (file, size) = check_pool_file(target, min_size)?;
    let (dir, name) = match (link.parent(), link.file_name()) {
        (Some(d), Some(n)) if !d.as_os_str().is_empty() => (d, n),
        _ => {
            return Err(RamLinkError::Invalid(format!(
                "RAM link path {} has no directory or file name",
                link.display()
            )))
        }
    };
    if !link.is_absolute() {
        return Err(RamLinkError::NotAbsolute {
            what: "the RAM link",
            path: link.to_path_buf(),
        });
    }
    match fs::metadata(dir) {
        Ok(md) if md.is_dir() => {}
        Ok(_) | Err(_) => {
            return Err(RamLinkError::LinkDirMissing {
                dir: dir.to_path_buf(),
            })
        }
    }

    let already = |file: FileIdentity| -> Option<RamLink> {
        let md = fs::symlink_metadata(link).ok()?;
        if md.file_type().is_symlink() && file_id(link).ok()? == file {
            Some(RamLink {
                link: link.to_path_buf(),
                target: target.to_path_buf(),
                file,
                size,
                created: false,
            })
        } else {
            None
        }
    };
    if fs::symlink_metadata(link).is_ok() {
        return already(file).ok_or_else(|| RamLinkError::LinkExists {
            link: link.to_path_buf(),
            what: describe_existing(link),
        });
    }

    let tmp = dir.join(format!(
        ".{}.vmbeam-tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::os::unix::fs::symlink(target, &tmp).map_err(|source| RamLinkError::Io {
        op: "create temporary symlink",
        path: tmp.clone(),
        source,
    })?;
    let placed = match renameat2(None, &tmp, None, link, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOSYS) => {
            // File system without RENAME_NOREPLACE: link(2) of the symlink itself is just as
            // atomic and never replaces an existing entry.
            let r = fs::hard_link(&tmp, link);
            let _ = fs::remove_file(&tmp);
            r
        }
        Err(e) => Err(io::Error::from(e)),
    };
    if let Err(source) = placed {
        let _ = fs::remove_file(&tmp);
        if source.kind() == io::ErrorKind::AlreadyExists {
            return already(file).ok_or_else(|| RamLinkError::LinkExists {
                link: link.to_path_buf(),
                what: describe_existing(link),
            });
        }
        return Err(RamLinkError::Io {
            op: "move RAM link into place at",
            path: link.to_path_buf(),
            source,
        });
    }
    if let Err(source) = fs::File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(dir = %dir.display(), error = %source, "could not sync the RAM link directory");
    }
    // The pool file could have been replaced between the check and the link.
    match file_id(link) {
        Ok(id) if id == file => {}
        Ok(id) => {
            let _ = fs::remove_file(link);
            return Err(RamLinkError::NotSameFile {
                a: link.to_path_buf(),
                a_id: id,
                b: target.to_path_buf(),
                b_id: file,
            });
        }
        Err(e) => {
            let _ = fs::remove_file(link);
            return Err(e);
        }
    }
    tracing::info!(link = %link.display(), target = %target.display(), %file, "RAM path linked to pool file");
    Ok(RamLink {
        link: link.to_path_buf(),
        target: target.to_path_buf(),
        file,
        size,
        created: true,
    })
}

/// Removes the RAM link at `link` if it is a symlink whose text is `expected_target` or
/// which resolves to the same file. Never touches the target. `Ok(false)` if nothing is there.
pub fn remove_ram_link(link: &Path, expected_target: &Path) -> Result<bool, RamLinkError> {
    let md = match fs::symlink_metadata(link) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(RamLinkError::Io {
                op: "stat",
                path: link.to_path_buf(),
                source,
            })
        }
    };
    if !md.file_type().is_symlink() {
        return Err(RamLinkError::NotASymlink {
            path: link.to_path_buf(),
        });
    }
    let text_matches = fs::read_link(link).ok().as_deref() == Some(expected_target);
    if !text_matches {
        verify_same_file(link, expected_target)?;
    }
    fs::remove_file(link).map_err(|source| RamLinkError::Io {
        op: "remove RAM link",
        path: link.to_path_buf(),
        source,
    })?;
    Ok(true)
}

/// Checks, from a `query-memdev` answer ([`crate::qmp::QmpClient::query_memdev`]), that the
/// backend `backend_id` is a file backend mapped shared, without prealloc, no larger than the
/// pool file, and that its `mem-path` resolves to `pool_file` (dev, ino). Refuses memfd,
/// anonymous and `share=off` backends. Returns the pool file's identity.
///
/// The `mem-path` is resolved in this process's mount namespace; when QEMU runs in another
/// one, prefer [`verify_process_maps_file`], which looks at QEMU's actual mappings.
pub fn verify_memdev_backing(
    memdevs: &[Memdev],
    backend_id: &str,
    pool_file: &Path,
) -> Result<FileIdentity, RamLinkError> {
    let Some(m) = memdevs.iter().find(|m| m.id.as_deref() == Some(backend_id)) else {
        return Err(RamLinkError::MemdevMissing {
            id: backend_id.to_owned(),
            have: memdevs.iter().filter_map(|m| m.id.clone()).collect(),
        });
    };
    let id = backend_id.to_owned();
    let not_file = match &m.kind {
        BackendKind::File => None,
        BackendKind::Memfd => Some("memory-backend-memfd".to_owned()),
        BackendKind::Ram => Some("memory-backend-ram".to_owned()),
        BackendKind::Other(t) => Some(t.clone()),
        BackendKind::Unknown => Some("of unknown type".to_owned()),
    };
    if let Some(kind) = not_file {
        return Err(RamLinkError::NotFileBacked { id, kind });
    }
    if m.share != Some(true) {
        return Err(RamLinkError::NotShared { id, share: m.share });
    }
    if m.prealloc {
        return Err(RamLinkError::Preallocated { id });
    }
    let Some(mem_path) = m.mem_path.as_deref().filter(|p| p.is_absolute()) else {
        return Err(RamLinkError::MemPathUnknown { id });
    };
    let file = verify_same_file(mem_path, pool_file)?;
    let file_size = fs::metadata(pool_file)
        .map_err(|source| RamLinkError::Io {
            op: "stat",
            path: pool_file.to_path_buf(),
            source,
        })?
        .len();
    if m.size > file_size {
        return Err(RamLinkError::BackendLargerThanFile {
            id,
            size: m.size,
            file_size,
        });
    }
    Ok(file)
}

/// Proves that process `pid` maps `pool_file` shared: scans `/proc/<pid>/maps` for mappings
/// with the file's (dev, ino) and the `s` (MAP_SHARED) flag. Returns the bytes so mapped.
/// This sees through paths and mount namespaces: it is what QEMU really uses.
pub fn verify_process_maps_file(pid: u32, pool_file: &Path) -> Result<u64, RamLinkError> {
    let id = file_id(pool_file)?;
    let maps_path = PathBuf::from(format!("/proc/{pid}/maps"));
    let maps = fs::read_to_string(&maps_path).map_err(|source| RamLinkError::Io {
        op: "read",
        path: maps_path.clone(),
        source,
    })?;
    let (shared, private) = scan_maps(&maps, id);
    if shared == 0 {
        return Err(RamLinkError::NotMappedShared {
            pid,
            path: pool_file.to_path_buf(),
            id,
            private_only: private > 0,
        });
    }
    Ok(shared)
}

/// Sums the bytes of shared and private mappings of file `id` in a `/proc/PID/maps` text
/// (also vmbeamd's check that nothing maps a shared device before the host unplugs it).
pub fn scan_maps(maps: &str, id: FileIdentity) -> (u64, u64) {
    let (want_major, want_minor) = (id.dev_major(), id.dev_minor());
    let (mut shared, mut private) = (0u64, 0u64);
    for line in maps.lines() {
        let mut f = line.split_ascii_whitespace();
        let (Some(range), Some(perms), Some(_off), Some(dev), Some(ino)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let Ok(ino) = ino.parse::<u64>() else {
            continue;
        };
        let Some((maj, min)) = dev.split_once(':') else {
            continue;
        };
        let (Ok(maj), Ok(min)) = (u64::from_str_radix(maj, 16), u64::from_str_radix(min, 16))
        else {
            continue;
        };
        if ino != id.ino || maj != want_major || min != want_minor {
            continue;
        }
        let Some((lo, hi)) = range.split_once('-') else {
            continue;
        };
        let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) else {
            continue;
        };
        let len = hi.saturating_sub(lo);
        if perms.as_bytes().get(3) == Some(&b's') {
            shared += len;
        } else {
            private += len;
        }
    }
    (shared, private)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(dir: &Path, name: &str, size: u64) -> PathBuf {
        let p = dir.join(name);
        let f = fs::File::create(&p).expect("create");
        f.set_len(size).expect("set_len");
        p
    }

    #[test]
    fn libvirt_names() {
        assert_eq!(libvirt_numa_ram_file(3), "ram-node3");
        assert_eq!(
            libvirt_short_name(7, "abcdefghijklmnopqrstuvwxyz0123"),
            "7-abcdefghijklmnopqrst"
        );
        assert_eq!(
            libvirt_domain_memory_dir(Path::new("/dev/hugepages"), 12, "vm1"),
            Path::new("/dev/hugepages/libvirt/qemu/12-vm1")
        );
        // characters, not bytes
        assert_eq!(
            libvirt_short_name(1, &"é".repeat(25)),
            format!("1-{}", "é".repeat(20))
        );
    }

    #[test]
    fn links_atomically_and_idempotently() {
        let d = tempfile::tempdir().expect("tempdir");
        let target = pool(d.path(), "pool-1", 1 << 20);
        let dom = d.path().join("1-vm");
        fs::create_dir(&dom).expect("mkdir");
        let link = dom.join(LIBVIRT_DEFAULT_RAM_FILE);
        let l = link_ram_path(&link, &target, 1 << 20).expect("link");
        assert!(l.created);
        assert_eq!(fs::read_link(&link).expect("readlink"), target);
        assert_eq!(verify_same_file(&link, &target).expect("same"), l.file);
        // no temporary left behind
        let names: Vec<_> = fs::read_dir(&dom)
            .expect("ls")
            .map(|e| e.expect("e").file_name())
            .collect();
        assert_eq!(names, [LIBVIRT_DEFAULT_RAM_FILE]);
        // idempotent
        let again = link_ram_path(&link, &target, 1).expect("again");
        assert!(!again.created);
        // another target: refused, existing link untouched
        let other = pool(d.path(), "pool-2", 1 << 20);
        let e = link_ram_path(&link, &other, 1).expect_err("exists");
        assert!(matches!(e, RamLinkError::LinkExists { .. }), "{e}");
        assert_eq!(fs::read_link(&link).expect("readlink"), target);
        // a regular file there (e.g. QEMU-created): refused, untouched
        let reg = dom.join("ram-node0");
        fs::write(&reg, b"x").expect("write");
        let e = link_ram_path(&reg, &target, 1).expect_err("regular file");
        assert!(matches!(e, RamLinkError::LinkExists { .. }), "{e}");
        assert_eq!(fs::read(&reg).expect("read"), b"x");
        // remove: only the link, never the target
        assert!(matches!(
            remove_ram_link(&reg, &target),
            Err(RamLinkError::NotASymlink { .. })
        ));
        assert!(matches!(
            remove_ram_link(&link, &other),
            Err(RamLinkError::NotSameFile { .. })
        ));
        assert!(remove_ram_link(&link, &target).expect("remove"));
        assert!(!remove_ram_link(&link, &target).expect("gone"));
        assert!(target.exists());
    }

    #[test]
    fn refuses_dangling_short_and_odd_targets() {
        let d = tempfile::tempdir().expect("tempdir");
        let link = d.path().join(LIBVIRT_DEFAULT_RAM_FILE);
        let missing = d.path().join("nope");
        assert!(matches!(
            link_ram_path(&link, &missing, 4096),
            Err(RamLinkError::TargetMissing { .. })
        ));
        let short = pool(d.path(), "short", 4096);
        assert!(matches!(
            link_ram_path(&link, &short, 8192),
            Err(RamLinkError::TargetTooShort {
                size: 4096,
                required: 8192,
                ..
            })
        ));
        assert!(matches!(
            link_ram_path(&link, d.path(), 1),
            Err(RamLinkError::TargetNotRegular {
                kind: "directory",
                ..
            })
        ));
        assert!(matches!(
            link_ram_path(&link, Path::new("relative/file"), 1),
            Err(RamLinkError::NotAbsolute { .. })
        ));
        assert!(matches!(
            link_ram_path(&link, &short, 0),
            Err(RamLinkError::Invalid(_))
        ));
        // a symlink to a missing file as target is dangling too
        let dangling = d.path().join("dangling");
        std::os::unix::fs::symlink(&missing, &dangling).expect("symlink");
        assert!(matches!(
            link_ram_path(&link, &dangling, 1),
            Err(RamLinkError::TargetMissing { .. })
        ));
        // directory missing
        assert!(matches!(
            link_ram_path(&d.path().join("no/dir/pc.ram"), &short, 1),
            Err(RamLinkError::LinkDirMissing { .. })
        ));
        assert!(matches!(
            link_ram_path(Path::new("/"), &short, 1),
            Err(RamLinkError::Invalid(_))
        ));
        // nothing was created by any refusal
        assert!(fs::symlink_metadata(&link).is_err());
    }

    #[test]
    fn same_file_by_dev_and_inode() {
        let d = tempfile::tempdir().expect("tempdir");
        let a = pool(d.path(), "a", 10);
        let b = pool(d.path(), "b", 10);
        let hard = d.path().join("a-hard");
        fs::hard_link(&a, &hard).expect("hard link");
        let sym = d.path().join("a-sym");
        std::os::unix::fs::symlink(&a, &sym).expect("symlink");
        verify_same_file(&a, &hard).expect("hard link is the same file");
        verify_same_file(&sym, &hard).expect("symlink resolves");
        let e = verify_same_file(&a, &b).expect_err("different");
        assert!(matches!(e, RamLinkError::NotSameFile { .. }));
        // a copy with identical content is still a different file
        let c = d.path().join("a-copy");
        fs::copy(&a, &c).expect("copy");
        assert!(verify_same_file(&a, &c).is_err());
        assert!(matches!(
            verify_same_file(&a, &d.path().join("missing")),
            Err(RamLinkError::Io { .. })
        ));
    }

    #[test]
    fn concurrent_linkers_agree() {
        let d = tempfile::tempdir().expect("tempdir");
        let t1 = pool(d.path(), "t1", 4096);
        let t2 = pool(d.path(), "t2", 4096);
        let link = d.path().join("pc.ram");
        let results: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|i| {
                    let (link, t) = (&link, if i % 2 == 0 { &t1 } else { &t2 });
                    s.spawn(move || link_ram_path(link, t, 4096).map(|l| l.target))
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("join")).collect()
        });
        let winner = fs::read_link(&link).expect("readlink");
        for r in results {
            match r {
                Ok(t) => assert_eq!(t, winner),
                Err(e) => assert!(matches!(e, RamLinkError::LinkExists { .. }), "{e}"),
            }
        }
        assert_eq!(fs::read_dir(d.path()).expect("ls").count(), 3);
    }

    fn memdev(kind: BackendKind, share: Option<bool>, path: Option<&Path>, size: u64) -> Memdev {
        Memdev {
            id: Some("pc.ram".into()),
            size,
            share,
            prealloc: false,
            merge: true,
            dump: true,
            reserve: Some(true),
            policy: "default".into(),
            host_nodes: vec![],
            kind,
            mem_path: path.map(Path::to_path_buf),
        }
    }

    #[test]
    fn memdev_checks() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = pool(d.path(), "pool", 8192);
        let other = pool(d.path(), "other", 8192);
        let ok = memdev(BackendKind::File, Some(true), Some(&p), 8192);
        verify_memdev_backing(std::slice::from_ref(&ok), "pc.ram", &p).expect("ok");
        let e = verify_memdev_backing(std::slice::from_ref(&ok), "ram-node0", &p).expect_err("id");
        assert!(matches!(e, RamLinkError::MemdevMissing { .. }));
        let e =
            verify_memdev_backing(std::slice::from_ref(&ok), "pc.ram", &other).expect_err("file");
        assert!(matches!(e, RamLinkError::NotSameFile { .. }));
        let memfd = memdev(BackendKind::Memfd, Some(true), None, 8192);
        assert!(matches!(
            verify_memdev_backing(&[memfd], "pc.ram", &p),
            Err(RamLinkError::NotFileBacked { .. })
        ));
        let private = memdev(BackendKind::File, Some(false), Some(&p), 8192);
        assert!(matches!(
            verify_memdev_backing(&[private], "pc.ram", &p),
            Err(RamLinkError::NotShared { .. })
        ));
        let mut pre = ok.clone();
        pre.prealloc = true;
        assert!(matches!(
            verify_memdev_backing(&[pre], "pc.ram", &p),
            Err(RamLinkError::Preallocated { .. })
        ));
        let big = memdev(BackendKind::File, Some(true), Some(&p), 16384);
        assert!(matches!(
            verify_memdev_backing(&[big], "pc.ram", &p),
            Err(RamLinkError::BackendLargerThanFile { .. })
        ));
        let rel = memdev(BackendKind::File, Some(true), Some(Path::new("pool")), 8192);
        assert!(matches!(
            verify_memdev_backing(&[rel], "pc.ram", &p),
            Err(RamLinkError::MemPathUnknown { .. })
        ));
    }

    #[test]
    fn maps_scanning() {
        let id = FileIdentity {
            dev: nix::sys::stat::makedev(0xfe, 0x01),
            ino: 4242,
        };
        let maps = "\
7f0000000000-7f0010000000 rw-s 00000000 fe:01 4242                       /dev/shm/pool (deleted)
7f0010000000-7f0010001000 r--p 00000000 fe:01 4242                       /dev/shm/pool
7f0020000000-7f0020001000 rw-s 00000000 fe:02 4242                       /elsewhere
garbage line
7f0030000000-7f0030001000 rw-p 00000000 00:00 0
";
        assert_eq!(scan_maps(maps, id), (0x1000_0000, 0x1000));
    }
}
