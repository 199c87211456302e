//! Validated identifiers and small value types shared by every module: the cloud VM's host
//! id, the virtual IaaS cloud id, the guest domain's UUID, nonces and file identities.
//!
//! They end up in file names, D-Bus paths, tickets and XML, so they are checked once, when
//! they are made, and carried as types afterwards. This module imports no other module of
//! the crate: the pool, tickets and metadata all stand on it.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::str::FromStr;

use rand::RngCore;
use serde::{Deserialize, Serialize};

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The string is empty.
    #[error("{kind} is empty")]
    Empty {
        /// Which identifier was being parsed.
        kind: &'static str,
    },
    /// The string is longer than allowed.
    #[error("{kind} is longer than {max} characters")]
    TooLong {
        /// Which identifier was being parsed.
        kind: &'static str,
        /// The maximum length.
        max: usize,
    },
    /// The string contains a character outside `[A-Za-z0-9._-]` or starts with `.` or `-`.
    #[error("{kind} '{value}' may only contain letters, digits, '.', '_' and '-', and must start with a letter or digit")]
    BadCharacter {
        /// Which identifier was being parsed.
        kind: &'static str,
        /// The offending value.
        value: String,
    },
    /// The string is not a UUID in the `8-4-4-4-12` hexadecimal form.
    #[error("'{0}' is not a UUID of the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx")]
    BadUuid(String),
    /// The string is not a nonce (exactly 32 hexadecimal digits).
    #[error("'{0}' is not a nonce of 32 hexadecimal digits")]
    BadNonce(String),
}

/// Checks the common name syntax: 1..=max characters from `[A-Za-z0-9._-]`, first one
/// alphanumeric (so a name is never `.`, `..` or an option-looking `-x`).
fn check_name(kind: &'static str, value: &str, max: usize) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if value.len() > max {
        return Err(IdError::TooLong { kind, max });
    }
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    let first_ok = value
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok || !value.chars().all(ok_char) {
        return Err(IdError::BadCharacter {
            kind,
            value: value.to_owned(),
        });
    }
    Ok(())
}

macro_rules! name_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Maximum length in characters.
            pub const MAX_LEN: usize = $max;

            /// Validates and wraps `value`.
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                check_name($kind, &value, $max)?;
                Ok(Self(value))
            }

            /// The identifier as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_id!(
    /// The identity of a cloud VM (one libvirt instance), e.g. `cvm1`: normally its host name.
    HostId,
    "host id",
    64
);

name_id!(
    /// The identity of a virtual IaaS cloud, e.g. `acme-virtual-iaas`. Zero-copy migration
    /// happens only between cloud VMs of the same cloud.
    CloudId,
    "cloud id",
    128
);

/// A libvirt domain UUID in canonical form: lowercase, `8-4-4-4-12` hexadecimal digits.
///
/// Uppercase input is accepted and normalised, as libvirt does; other spellings libvirt
/// tolerates on input (no dashes, braces) are refused because libvirt never prints them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DomainUuid(String);

impl DomainUuid {
    /// Validates `value` and normalises it to lowercase.
    pub fn new(value: &str) -> Result<Self, IdError> {
        let bytes = value.as_bytes();
        let well_formed = bytes.len() == 36
            && bytes.iter().enumerate().all(|(i, b)| match i {
                8 | 13 | 18 | 23 => *b == b'-',
                _ => b.is_ascii_hexdigit(),
            });
        if !well_formed {
            return Err(IdError::BadUuid(value.to_owned()));
        }
        Ok(Self(value.to_ascii_lowercase()))
    }

    /// The UUID as a string slice (lowercase, with dashes).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for DomainUuid {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::new(s)
    }
}

impl TryFrom<String> for DomainUuid {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::new(&s)
    }
}

impl From<DomainUuid> for String {
    fn from(id: DomainUuid) -> String {
        id.0
    }
}

impl fmt::Display for DomainUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for DomainUuid {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A random 128-bit value, shown as 32 lowercase hex digits (names proofs and rendezvous
/// files, makes tickets unique).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Nonce(pub [u8; 16]);

impl Nonce {
    /// A fresh nonce from the operating system's random source.
    pub fn random() -> Self {
        let mut bytes = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// The nonce in hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Nonce({})", self.to_hex())
    }
}

impl FromStr for Nonce {
    type Err = IdError;
    /// Parses exactly 32 hex digits.
    fn from_str(s: &str) -> Result<Self, IdError> {
        let mut bytes = [0u8; 16];
        if s.len() != 32 || hex::decode_to_slice(s, &mut bytes).is_err() {
            return Err(IdError::BadNonce(s.to_owned()));
        }
        Ok(Self(bytes))
    }
}

impl TryFrom<String> for Nonce {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        s.parse()
    }
}

impl From<Nonce> for String {
    fn from(n: Nonce) -> String {
        n.to_hex()
    }
}

/// A file's device and inode numbers (`stat`, symlinks followed): its identity within one
/// kernel.
///
/// This is the one place of the "same file on both ends" question (pool files, proof files,
/// the file a QEMU maps). Device/inode numbers identify a file only within one kernel: where
/// the pool is shared between separate kernels both sides' numbers differ even for the same
/// file, and every comparison of them assumes one kernel (namespaced libvirt instances, the
/// lab). A cross-kernel identity (a random stamp in the file, say) belongs here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileIdentity {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
}

impl FileIdentity {
    /// The identity in `meta`.
    pub fn from_metadata(meta: &fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }

    /// The identity of what `path` refers to (symlinks followed, as QEMU's `open` does).
    pub fn of(path: &Path) -> io::Result<Self> {
        fs::metadata(path).map(|m| Self::from_metadata(&m))
    }

    /// The device's major number (Linux's encoding of `dev_t`, as glibc's `major`).
    pub fn dev_major(&self) -> u64 {
        ((self.dev >> 8) & 0xfff) | ((self.dev >> 32) & 0xffff_f000)
    }

    /// The device's minor number (Linux's encoding of `dev_t`, as glibc's `minor`).
    pub fn dev_minor(&self) -> u64 {
        (self.dev & 0xff) | ((self.dev >> 12) & 0xffff_ff00)
    }
}

impl fmt::Display for FileIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "dev {}:{} inode {}",
            self.dev_major(),
            self.dev_minor(),
            self.ino
        )
    }
}

/// Parses ASCII decimal digits only (no sign, no spaces) into a `u64`.
pub(crate) fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ids() {
        assert!(HostId::new("cvm1").is_ok());
        assert!(HostId::new("cvm-1.lab_a").is_ok());
        assert_eq!(
            HostId::new("").unwrap_err(),
            IdError::Empty { kind: "host id" }
        );
        for bad in ["-x", ".hidden", "..", "a/b", "a b", "é", "a\0"] {
            assert!(
                matches!(HostId::new(bad), Err(IdError::BadCharacter { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            HostId::new("a".repeat(65)),
            Err(IdError::TooLong { max: 64, .. })
        ));
        assert!(CloudId::new("a".repeat(128)).is_ok());
    }

    #[test]
    fn uuids() {
        let u = DomainUuid::new("6E3B1E9A-1B2C-4D5E-8F90-0123456789AB").unwrap();
        assert_eq!(u.as_str(), "6e3b1e9a-1b2c-4d5e-8f90-0123456789ab");
        for bad in [
            "",
            "6e3b1e9a1b2c4d5e8f900123456789ab",
            "6e3b1e9a-1b2c-4d5e-8f90-0123456789a",
            "6e3b1e9a-1b2c-4d5e-8f90-0123456789ag",
            "{6e3b1e9a-1b2c-4d5e-8f90-0123456789a}",
            "6e3b1e9a-1b2c-4d5e-8f90+0123456789ab",
        ] {
            assert!(DomainUuid::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn serde_validates() {
        let ok: HostId = serde_json::from_str("\"cvm2\"").unwrap();
        assert_eq!(ok.as_str(), "cvm2");
        assert!(serde_json::from_str::<HostId>("\"../etc\"").is_err());
        assert!(serde_json::from_str::<DomainUuid>("\"nope\"").is_err());
        assert_eq!(serde_json::to_string(&ok).unwrap(), "\"cvm2\"");
    }

    #[test]
    fn nonces() {
        let n = Nonce([0xab; 16]);
        assert_eq!(n.to_string(), "ab".repeat(16));
        assert_eq!(n.to_string().parse::<Nonce>().unwrap(), n);
        let json = serde_json::to_string(&n).unwrap();
        assert_eq!(serde_json::from_str::<Nonce>(&json).unwrap(), n);
        assert!(serde_json::from_str::<Nonce>("\"abc\"").is_err());
        assert_eq!(
            "abc".parse::<Nonce>().unwrap_err(),
            IdError::BadNonce("abc".into())
        );
        assert!("zz".repeat(16).parse::<Nonce>().is_err());
        assert_ne!(Nonce::random(), Nonce::random());
    }

    #[test]
    fn file_identities() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        fs::write(&a, "x").unwrap();
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(&a, &link).unwrap();
        let id = FileIdentity::of(&a).unwrap();
        assert_eq!(
            FileIdentity::of(&link).unwrap(),
            id,
            "symlinks are followed"
        );
        assert!(FileIdentity::of(&dir.path().join("missing")).is_err());
        // Linux's dev_t encoding (glibc's makedev).
        let makedev = |major: u64, minor: u64| {
            ((major & 0xffff_f000) << 32)
                | ((major & 0xfff) << 8)
                | ((minor & 0xffff_ff00) << 12)
                | (minor & 0xff)
        };
        let sda1 = FileIdentity {
            dev: makedev(8, 1),
            ino: 5,
        };
        assert_eq!(sda1.to_string(), "dev 8:1 inode 5");
        for (major, minor) in [(259, 65536), (0x12345, 0xabcdef), (0, 0)] {
            let id = FileIdentity {
                dev: makedev(major, minor),
                ino: 1,
            };
            assert_eq!((id.dev_major(), id.dev_minor()), (major, minor));
        }
    }

    #[test]
    fn decimals() {
        assert_eq!(parse_decimal("042"), Some(42));
        for bad in ["", "-1", "+1", " 1", "1e3", "18446744073709551616"] {
            assert_eq!(parse_decimal(bad), None, "{bad}");
        }
    }
}
