//! Validated identifiers shared by every module: the cloud VM's host id, the virtual IaaS
//! cloud id and the guest domain's UUID.
//!
//! They end up in file names, D-Bus paths, tickets and XML, so they are checked once, when
//! they are made, and carried as types afterwards.

use std::fmt;
use std::str::FromStr;

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
}
