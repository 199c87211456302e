//! The cloud VM's own identity, from `/etc/vmbeam/vmbeam.conf`.
//!
//! The file is a strict subset of TOML: `key = value` lines, `#` comments, blank lines;
//! values are basic strings (`"…"` with `\"` and `\\` escapes) or non-negative integers.
//! That keeps it editable by hand and by configuration management, and valid TOML should
//! the project ever switch to a full TOML parser, without adding a dependency now. Unknown
//! and repeated keys are errors, so typos do not go unnoticed.
//!
//! ```toml
//! # /etc/vmbeam/vmbeam.conf
//! host_id = "cvm1"
//! cloud = "acme-virtual-iaas"
//! pool_dir = "/var/lib/vmbeam/pool"
//! key_file = "/etc/vmbeam/cloud.key"
//! ticket_ttl_secs = 30
//! ```
//!
//! The beam pool is the shared directory `pool_dir` unless `pool_kind` says otherwise
//! ([`PoolKind`]). In a cloud VM that is a real VM on a primary cloud's host running
//! `vmbeam-host`, guest RAM comes from hot-plugged shared memory devices instead:
//!
//! ```toml
//! pool_kind = "host-device"
//! host_channel = "/dev/virtio-ports/org.vmbeam.host.0"   # the default
//! pci_devices_dir = "/sys/bus/pci/devices"               # the default
//! ```
//!
//! (Flat keys rather than a `[pool]` table: the file stays the strict TOML subset above.)

use std::fs::File;
use std::io::Read as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::ids::{CloudId, HostId, IdError};
use crate::ticket::{TicketError, TicketKey, MAX_TICKET_TTL_SECS};

/// Where the configuration lives.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/vmbeam/vmbeam.conf";
/// Ticket validity when the file does not set `ticket_ttl_secs`.
pub const DEFAULT_TICKET_TTL_SECS: u64 = 30;
/// Where the host channel is inside a cloud VM (udev's name for the virtio-serial port
/// `org.vmbeam.host.0`), unless `host_channel` says otherwise.
pub const DEFAULT_HOST_CHANNEL: &str = "/dev/virtio-ports/org.vmbeam.host.0";
/// Where the kernel lists PCI devices (`ADDR/resource2` is an ivshmem device's BAR 2),
/// unless `pci_devices_dir` says otherwise.
pub const DEFAULT_PCI_DEVICES_DIR: &str = "/sys/bus/pci/devices";
/// Largest configuration or key file read.
const MAX_FILE_LEN: u64 = 64 * 1024;

/// Why the identity could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The configuration file cannot be read.
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// A line is not `key = value`.
    #[error("line {line}: {message}")]
    Syntax {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: &'static str,
    },
    /// A key this version does not know.
    #[error("line {line}: unknown setting '{key}'")]
    UnknownKey {
        /// 1-based line number.
        line: usize,
        /// The key.
        key: String,
    },
    /// A key given twice.
    #[error("line {line}: '{key}' is set twice")]
    DuplicateKey {
        /// 1-based line number of the second setting.
        line: usize,
        /// The key.
        key: String,
    },
    /// A required key is absent.
    #[error("missing required setting '{0}'")]
    Missing(&'static str),
    /// A value of the wrong type or form.
    #[error("'{key}' must be {expected}")]
    BadValue {
        /// The key.
        key: &'static str,
        /// What is expected.
        expected: &'static str,
    },
    /// An identifier value is invalid.
    #[error("invalid '{key}'")]
    BadId {
        /// The key.
        key: &'static str,
        /// Why.
        #[source]
        source: IdError,
    },
    /// The key file cannot be read.
    #[error("cannot read key file {0}")]
    KeyRead(PathBuf, #[source] std::io::Error),
    /// The key file is not a regular file.
    #[error("key file {0} is not a regular file")]
    KeyNotRegular(PathBuf),
    /// The key file can be read by others than its owner.
    #[error("key file {path} has mode {mode:o}, readable by group or others; run chmod 600 on it")]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file's content is not a usable key.
    #[error("key file {0} does not hold a usable key")]
    BadKey(PathBuf, #[source] TicketError),
}

/// This cloud VM's identity and VMBeam settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// This cloud VM's name.
    pub host_id: HostId,
    /// The virtual IaaS cloud it belongs to.
    pub cloud: CloudId,
    /// The beam pool directory as this cloud VM sees it.
    pub pool_dir: PathBuf,
    /// The file holding the cloud's ticket key.
    pub key_file: PathBuf,
    /// Validity of the tickets this host issues, in seconds.
    pub ticket_ttl_secs: u64,
    /// Where guest RAM comes from (`pool_kind`).
    pub pool: PoolKind,
}

/// The kind of beam pool a cloud VM takes guest RAM from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolKind {
    /// A directory on memory every co-located cloud VM sees (`pool_dir`; one kernel, the
    /// namespace lab): `pool_kind = "directory"`, the default.
    Directory,
    /// One `ivshmem-plain` device per guest, hot-plugged by the primary cloud's
    /// `vmbeam-host`, asked over the host channel: `pool_kind = "host-device"`.
    HostDevice {
        /// The host channel (`host_channel`: the virtio-serial port, or a unix socket).
        channel: PathBuf,
        /// The kernel's PCI device directory (`pci_devices_dir`), where a device's BAR 2
        /// is `ADDR/resource2`.
        pci_devices: PathBuf,
    },
}

impl PoolKind {
    /// The configuration's name of the kind.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Directory => "directory",
            Self::HostDevice { .. } => "host-device",
        }
    }
}

enum Value {
    Str(String),
    Int(u64),
}

impl Identity {
    /// Loads [`DEFAULT_CONFIG_PATH`].
    pub fn load_default() -> Result<Self, IdentityError> {
        Self::load(Path::new(DEFAULT_CONFIG_PATH))
    }

    /// Loads and validates the configuration at `path`.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let text = read_limited(path).map_err(|e| IdentityError::Read(path.to_path_buf(), e))?;
        let text = String::from_utf8(text).map_err(|_| IdentityError::Syntax {
            line: 0,
            message: "file is not UTF-8",
        })?;
        text.parse()
    }

    /// Reads the cloud's ticket key from [`Self::key_file`], refusing a key file that group
    /// or others can read, or that is not a regular file.
    pub fn load_key(&self) -> Result<TicketKey, IdentityError> {
        let path = &self.key_file;
        let key_err = |e| IdentityError::KeyRead(path.clone(), e);
        let mut file = File::open(path).map_err(key_err)?;
        let meta = file.metadata().map_err(key_err)?;
        if !meta.file_type().is_file() {
            return Err(IdentityError::KeyNotRegular(path.clone()));
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::KeyPermissions {
                path: path.clone(),
                mode,
            });
        }
        let mut content = Vec::new();
        (&mut file)
            .take(MAX_FILE_LEN)
            .read_to_end(&mut content)
            .map_err(key_err)?;
        TicketKey::from_file_content(&content).map_err(|e| IdentityError::BadKey(path.clone(), e))
    }
}

fn read_limited(path: &Path) -> std::io::Result<Vec<u8>> {
    let file = File::open(path)?;
    let mut out = Vec::new();
    file.take(MAX_FILE_LEN).read_to_end(&mut out)?;
    Ok(out)
}

impl FromStr for Identity {
    type Err = IdentityError;

    /// Parses the configuration text.
    fn from_str(text: &str) -> Result<Self, IdentityError> {
        const KEYS: [&str; 8] = [
            "host_id",
            "cloud",
            "pool_dir",
            "key_file",
            "ticket_ttl_secs",
            "pool_kind",
            "host_channel",
            "pci_devices_dir",
        ];
        let mut values: [Option<Value>; 8] = Default::default();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let content = raw.trim();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            let (key, rest) = content.split_once('=').ok_or(IdentityError::Syntax {
                line,
                message: "expected key = value",
            })?;
            let key = key.trim();
            let slot =
                KEYS.iter()
                    .position(|k| *k == key)
                    .ok_or_else(|| IdentityError::UnknownKey {
                        line,
                        key: key.to_owned(),
                    })?;
            let value = parse_value(rest.trim(), line)?;
            if values[slot].replace(value).is_some() {
                return Err(IdentityError::DuplicateKey {
                    line,
                    key: key.to_owned(),
                });
            }
        }
        let [host_id, cloud, pool_dir, key_file, ttl, kind, channel, pci_devices] = values;
        let string = |v: Option<Value>, key: &'static str| match v {
            None => Err(IdentityError::Missing(key)),
            Some(Value::Str(s)) => Ok(s),
            Some(Value::Int(_)) => Err(IdentityError::BadValue {
                key,
                expected: "a quoted string",
            }),
        };
        let abs_path = |v: Option<Value>, key: &'static str| {
            let s = string(v, key)?;
            let p = PathBuf::from(&s);
            if p.is_absolute() && !s.contains('\0') {
                Ok(p)
            } else {
                Err(IdentityError::BadValue {
                    key,
                    expected: "an absolute path",
                })
            }
        };
        let host_id =
            HostId::new(string(host_id, "host_id")?).map_err(|source| IdentityError::BadId {
                key: "host_id",
                source,
            })?;
        let cloud =
            CloudId::new(string(cloud, "cloud")?).map_err(|source| IdentityError::BadId {
                key: "cloud",
                source,
            })?;
        let pool_dir = abs_path(pool_dir, "pool_dir")?;
        let key_file = abs_path(key_file, "key_file")?;
        let ticket_ttl_secs = match ttl {
            None => DEFAULT_TICKET_TTL_SECS,
            Some(Value::Int(n)) if (1..=MAX_TICKET_TTL_SECS).contains(&n) => n,
            Some(_) => {
                return Err(IdentityError::BadValue {
                    key: "ticket_ttl_secs",
                    expected: "an integer from 1 to 600",
                })
            }
        };
        let pool = match kind.map(|v| string(Some(v), "pool_kind")).transpose()? {
            None => None,
            Some(k) if k == "directory" => None,
            Some(k) if k == "host-device" => Some(()),
            Some(_) => {
                return Err(IdentityError::BadValue {
                    key: "pool_kind",
                    expected: "\"directory\" or \"host-device\"",
                })
            }
        };
        let pool = match pool {
            None if channel.is_some() || pci_devices.is_some() => {
                return Err(IdentityError::BadValue {
                    key: "pool_kind",
                    expected: "\"host-device\" where host_channel or pci_devices_dir is set",
                })
            }
            None => PoolKind::Directory,
            Some(()) => PoolKind::HostDevice {
                channel: match channel {
                    None => PathBuf::from(DEFAULT_HOST_CHANNEL),
                    v => abs_path(v, "host_channel")?,
                },
                pci_devices: match pci_devices {
                    None => PathBuf::from(DEFAULT_PCI_DEVICES_DIR),
                    v => abs_path(v, "pci_devices_dir")?,
                },
            },
        };
        Ok(Self {
            host_id,
            cloud,
            pool_dir,
            key_file,
            ticket_ttl_secs,
            pool,
        })
    }
}

/// Parses a value: a basic string, optionally followed by a comment, or an integer.
fn parse_value(text: &str, line: usize) -> Result<Value, IdentityError> {
    let syntax = |message| IdentityError::Syntax { line, message };
    if let Some(rest) = text.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = rest.chars();
        loop {
            match chars.next() {
                None => return Err(syntax("unterminated string")),
                Some('"') => break,
                Some('\\') => match chars.next() {
                    Some('"') => out.push('"'),
                    Some('\\') => out.push('\\'),
                    _ => return Err(syntax("unsupported escape (only \\\" and \\\\)")),
                },
                Some(c) if c.is_control() => return Err(syntax("control character in string")),
                Some(c) => out.push(c),
            }
        }
        let tail = chars.as_str().trim();
        if !(tail.is_empty() || tail.starts_with('#')) {
            return Err(syntax("unexpected text after the value"));
        }
        return Ok(Value::Str(out));
    }
    let number = text.split('#').next().unwrap_or_default().trim();
    if number.is_empty() {
        return Err(syntax("missing value"));
    }
    crate::ids::parse_decimal(number)
        .map(Value::Int)
        .ok_or_else(|| syntax("value must be a quoted string or a non-negative integer"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test case's expectation on the error.
    type Check = fn(&IdentityError) -> bool;
    use std::fs;

    pub(super) const GOOD: &str = r#"
# VMBeam identity
host_id = "cvm1"
cloud = "acme-virtual-iaas"   # the secondary provider's cloud
pool_dir = "/var/lib/vmbeam/pool"
key_file = "/etc/vmbeam/cloud.key"
ticket_ttl_secs = 45
"#;

    #[test]
    fn parses() {
        let id: Identity = GOOD.parse().unwrap();
        assert_eq!(id.host_id.as_str(), "cvm1");
        assert_eq!(id.cloud.as_str(), "acme-virtual-iaas");
        assert_eq!(id.pool_dir, PathBuf::from("/var/lib/vmbeam/pool"));
        assert_eq!(id.key_file, PathBuf::from("/etc/vmbeam/cloud.key"));
        assert_eq!(id.ticket_ttl_secs, 45);
        assert_eq!(id.pool, PoolKind::Directory);
        let no_ttl = GOOD.replace("ticket_ttl_secs = 45", "");
        assert_eq!(
            no_ttl.parse::<Identity>().unwrap().ticket_ttl_secs,
            DEFAULT_TICKET_TTL_SECS
        );
        let escaped = GOOD.replace("\"/var/lib/vmbeam/pool\"", r#""/var/lib/vm\"beam\\pool""#);
        assert_eq!(
            escaped.parse::<Identity>().unwrap().pool_dir,
            PathBuf::from(r#"/var/lib/vm"beam\pool"#)
        );
    }

    #[test]
    fn the_pool_kind_is_a_directory_unless_it_says_host_device() {
        let explicit = format!("{GOOD}pool_kind = \"directory\"\n");
        assert_eq!(
            explicit.parse::<Identity>().unwrap().pool,
            PoolKind::Directory
        );
        let device = format!("{GOOD}pool_kind = \"host-device\"\n");
        let id = device.parse::<Identity>().unwrap();
        assert_eq!(
            id.pool,
            PoolKind::HostDevice {
                channel: PathBuf::from(DEFAULT_HOST_CHANNEL),
                pci_devices: PathBuf::from(DEFAULT_PCI_DEVICES_DIR),
            }
        );
        assert_eq!(id.pool.name(), "host-device");
        let placed =
            format!("{device}host_channel = \"/run/h.sock\"\npci_devices_dir = \"/tmp/pci\"\n");
        assert_eq!(
            placed.parse::<Identity>().unwrap().pool,
            PoolKind::HostDevice {
                channel: PathBuf::from("/run/h.sock"),
                pci_devices: PathBuf::from("/tmp/pci"),
            }
        );
        let bad = |text: String, key: &str| {
            let err = text.parse::<Identity>().unwrap_err();
            assert!(
                matches!(&err, IdentityError::BadValue { key: k, .. } if *k == key),
                "{text}\n=> {err:?}"
            );
        };
        bad(format!("{GOOD}pool_kind = \"tmpfs\"\n"), "pool_kind");
        bad(format!("{GOOD}pool_kind = 2\n"), "pool_kind");
        // A channel without the kind that uses it is a mistake, not something to ignore.
        bad(
            format!("{GOOD}host_channel = \"/run/h.sock\"\n"),
            "pool_kind",
        );
        bad(
            format!("{device}pci_devices_dir = \"sys/bus\"\n"),
            "pci_devices_dir",
        );
        bad(
            format!("{device}host_channel = \"h.sock\"\n"),
            "host_channel",
        );
    }

    #[test]
    fn errors() {
        let cases: Vec<(String, Check)> = vec![
            (GOOD.replace("host_id = \"cvm1\"", ""), |e| {
                matches!(e, IdentityError::Missing("host_id"))
            }),
            (format!("{GOOD}\ncloud = \"x\""), |e| {
                matches!(e, IdentityError::DuplicateKey { line: 9, .. })
            }),
            (format!("{GOOD}\npool = \"/x\""), |e| {
                matches!(e, IdentityError::UnknownKey { .. })
            }),
            (format!("{GOOD}\njust words"), |e| {
                matches!(e, IdentityError::Syntax { line: 9, .. })
            }),
            (GOOD.replace("\"cvm1\"", "\"cvm1"), |e| {
                matches!(e, IdentityError::Syntax { line: 3, .. })
            }),
            (GOOD.replace("\"cvm1\"", "\"cvm1\" trailing"), |e| {
                matches!(e, IdentityError::Syntax { .. })
            }),
            (GOOD.replace("\"cvm1\"", "\"c\\nvm1\""), |e| {
                matches!(e, IdentityError::Syntax { .. })
            }),
            (GOOD.replace("\"cvm1\"", "cvm1"), |e| {
                matches!(e, IdentityError::Syntax { .. })
            }),
            (GOOD.replace("\"cvm1\"", "\"../cvm1\""), |e| {
                matches!(e, IdentityError::BadId { key: "host_id", .. })
            }),
            (GOOD.replace("\"cvm1\"", "12"), |e| {
                matches!(e, IdentityError::BadValue { key: "host_id", .. })
            }),
            (GOOD.replace("\"/var/lib/vmbeam/pool\"", "\"pool\""), |e| {
                matches!(
                    e,
                    IdentityError::BadValue {
                        key: "pool_dir",
                        ..
                    }
                )
            }),
            (GOOD.replace("45", "0"), |e| {
                matches!(
                    e,
                    IdentityError::BadValue {
                        key: "ticket_ttl_secs",
                        ..
                    }
                )
            }),
            (GOOD.replace("45", "\"45\""), |e| {
                matches!(
                    e,
                    IdentityError::BadValue {
                        key: "ticket_ttl_secs",
                        ..
                    }
                )
            }),
            (GOOD.replace("45", "-1"), |e| {
                matches!(e, IdentityError::Syntax { .. })
            }),
            (GOOD.replace("45", ""), |e| {
                matches!(e, IdentityError::Syntax { .. })
            }),
        ];
        for (text, check) in cases {
            let err = text.parse::<Identity>().unwrap_err();
            assert!(check(&err), "{text}\n=> {err:?}");
        }
    }

    #[test]
    fn loads_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("cloud.key");
        fs::write(&key_path, format!("{}\n", "5a".repeat(32))).unwrap();
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600)).unwrap();
        let conf_path = dir.path().join("vmbeam.conf");
        fs::write(
            &conf_path,
            GOOD.replace("/etc/vmbeam/cloud.key", key_path.to_str().unwrap()),
        )
        .unwrap();
        let id = Identity::load(&conf_path).unwrap();
        id.load_key().unwrap();

        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o640)).unwrap();
        let err = id.load_key().unwrap_err();
        assert!(matches!(
            err,
            IdentityError::KeyPermissions { mode: 0o640, .. }
        ));
        assert!(err.to_string().contains("chmod 600"));
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o604)).unwrap();
        assert!(matches!(
            id.load_key(),
            Err(IdentityError::KeyPermissions { .. })
        ));

        fs::write(&key_path, "short").unwrap();
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o400)).unwrap();
        assert!(matches!(id.load_key(), Err(IdentityError::BadKey(..))));

        let dir_key = Identity {
            key_file: dir.path().to_path_buf(),
            ..id.clone()
        };
        assert!(matches!(
            dir_key.load_key(),
            Err(IdentityError::KeyNotRegular(_) | IdentityError::KeyPermissions { .. })
        ));
        let missing = Identity {
            key_file: dir.path().join("absent"),
            ..id
        };
        assert!(matches!(
            missing.load_key(),
            Err(IdentityError::KeyRead(..))
        ));
        assert!(matches!(
            Identity::load(&dir.path().join("absent.conf")),
            Err(IdentityError::Read(..))
        ));
    }
}

#[cfg(test)]
mod prop_tests {
    use proptest::prelude::*;

    use super::tests::GOOD;
    use super::*;
    use crate::proptest_support::{mutate_text, proptest_config};

    proptest! {
        #![proptest_config(proptest_config())]

        #[test]
        fn prop_identity_arbitrary_text_never_panics(s in any::<String>()) {
            let _ = s.parse::<Identity>();
        }

        #[test]
        fn prop_identity_configish_text_never_panics(
            s in "([a-z_]{0,16} ?=? ?(\"[^\"\n]{0,20}\"?|[0-9-]{0,22}|true|false)? ?(#.{0,5})?\n){0,8}",
        ) {
            let _ = s.parse::<Identity>();
        }

        #[test]
        fn prop_identity_mutated_config_never_panics(
            mode in any::<u8>(),
            pos in any::<prop::sample::Index>(),
            b in any::<u8>(),
        ) {
            let text = mutate_text(GOOD, mode, pos, b);
            if let Ok(id) = text.parse::<Identity>() {
                prop_assert!(id.pool_dir.is_absolute());
            }
        }
    }
}
