//! The libvirt hook's view of an event: libvirt runs `/etc/libvirt/hooks/qemu.d/vmbeam`
//! (`libxl.d/` once a Xen backend exists) as `vmbeam DOMAIN OP SUBOP EXTRA` with the domain
//! XML on stdin.
//!
//! Unknown operations and sub-operations are kept as `Other` rather than refused: a hook that
//! fails makes libvirt fail the operation, and a newer libvirt must not break domains.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why hook arguments could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    /// libvirt always passes four arguments.
    #[error("expected 4 hook arguments (DOMAIN OP SUBOP EXTRA), got {0}")]
    WrongArgCount(usize),
    /// The object (domain name) is empty.
    #[error("hook object (domain name) is empty")]
    EmptyObject,
    /// The operation is empty.
    #[error("hook operation is empty")]
    EmptyOp,
}

/// The hook operation (libvirt's `virHookQemuOpType`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum HookOp {
    /// Before resources are allocated for a start.
    Prepare,
    /// Resources allocated, before QEMU starts (the memory directory exists).
    Start,
    /// QEMU started (on a migration destination: incoming, before the stream).
    Started,
    /// QEMU stopped.
    Stopped,
    /// Resources released after a stop.
    Release,
    /// An incoming migration begins; stdout replaces the domain XML.
    Migrate,
    /// A domain is restored from a save image; stdout may replace the XML.
    Restore,
    /// libvirtd reconnected to a running QEMU at its start.
    Reconnect,
    /// libvirt attached to an external QEMU.
    Attach,
    /// An operation this version does not know.
    Other(String),
}

impl HookOp {
    /// libvirt's name for the operation.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Prepare => "prepare",
            Self::Start => "start",
            Self::Started => "started",
            Self::Stopped => "stopped",
            Self::Release => "release",
            Self::Migrate => "migrate",
            Self::Restore => "restore",
            Self::Reconnect => "reconnect",
            Self::Attach => "attach",
            Self::Other(s) => s,
        }
    }
}

impl From<&str> for HookOp {
    fn from(s: &str) -> Self {
        match s {
            "prepare" => Self::Prepare,
            "start" => Self::Start,
            "started" => Self::Started,
            "stopped" => Self::Stopped,
            "release" => Self::Release,
            "migrate" => Self::Migrate,
            "restore" => Self::Restore,
            "reconnect" => Self::Reconnect,
            "attach" => Self::Attach,
            other => Self::Other(other.to_owned()),
        }
    }
}

impl From<String> for HookOp {
    fn from(s: String) -> Self {
        Self::from(s.as_str())
    }
}

impl From<HookOp> for String {
    fn from(op: HookOp) -> String {
        op.as_str().to_owned()
    }
}

impl fmt::Display for HookOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The hook sub-operation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum HookSubOp {
    /// `begin`.
    Begin,
    /// `end`.
    End,
    /// `-`: none.
    None,
    /// A sub-operation this version does not know.
    Other(String),
}

impl HookSubOp {
    /// libvirt's spelling.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Begin => "begin",
            Self::End => "end",
            Self::None => "-",
            Self::Other(s) => s,
        }
    }
}

impl From<&str> for HookSubOp {
    fn from(s: &str) -> Self {
        match s {
            "begin" => Self::Begin,
            "end" => Self::End,
            "-" => Self::None,
            other => Self::Other(other.to_owned()),
        }
    }
}

impl From<String> for HookSubOp {
    fn from(s: String) -> Self {
        Self::from(s.as_str())
    }
}

impl From<HookSubOp> for String {
    fn from(op: HookSubOp) -> String {
        op.as_str().to_owned()
    }
}

impl fmt::Display for HookSubOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One hook invocation's arguments.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HookEvent {
    /// The domain's name.
    pub object: String,
    /// The operation.
    pub op: HookOp,
    /// The sub-operation.
    pub sub_op: HookSubOp,
    /// The extra argument; `None` for libvirt's `-`.
    pub extra: Option<String>,
}

impl HookEvent {
    /// Parses the four arguments after the program name
    /// (`std::env::args().skip(1)`): `DOMAIN OP SUBOP EXTRA`.
    pub fn from_args<S: AsRef<str>>(args: &[S]) -> Result<Self, HookError> {
        let [object, op, sub_op, extra] = args else {
            return Err(HookError::WrongArgCount(args.len()));
        };
        let object = object.as_ref();
        if object.is_empty() {
            return Err(HookError::EmptyObject);
        }
        if op.as_ref().is_empty() {
            return Err(HookError::EmptyOp);
        }
        let extra = match extra.as_ref() {
            "-" => None,
            other => Some(other.to_owned()),
        };
        Ok(Self {
            object: object.to_owned(),
            op: HookOp::from(op.as_ref()),
            sub_op: HookSubOp::from(sub_op.as_ref()),
            extra,
        })
    }

    /// The arguments libvirt passed, for logs and tests.
    pub fn to_args(&self) -> [String; 4] {
        [
            self.object.clone(),
            self.op.as_str().to_owned(),
            self.sub_op.as_str().to_owned(),
            self.extra.clone().unwrap_or_else(|| "-".to_owned()),
        ]
    }

    /// Whether libvirt reads the hook's stdout as the new domain XML (`migrate begin` and
    /// `restore begin`): the hook must then print the XML and nothing else.
    pub fn output_replaces_xml(&self) -> bool {
        matches!(self.op, HookOp::Migrate | HookOp::Restore) && self.sub_op == HookSubOp::Begin
    }
}

impl fmt::Display for HookEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [o, op, sub, extra] = self.to_args();
        write!(f, "{o} {op} {sub} {extra}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libvirt_invocations() {
        let e = HookEvent::from_args(&["web1", "migrate", "begin", "-"]).unwrap();
        assert_eq!(e.op, HookOp::Migrate);
        assert_eq!(e.sub_op, HookSubOp::Begin);
        assert_eq!(e.extra, None);
        assert!(e.output_replaces_xml());
        assert_eq!(e.to_string(), "web1 migrate begin -");

        let e = HookEvent::from_args(&["web1", "started", "begin", "-"]).unwrap();
        assert_eq!(e.op, HookOp::Started);
        assert!(!e.output_replaces_xml());

        let e = HookEvent::from_args(&["web1", "release", "end", "-"]).unwrap();
        assert_eq!((e.op, e.sub_op), (HookOp::Release, HookSubOp::End));

        let e = HookEvent::from_args(&["web1", "restore", "begin", "-"]).unwrap();
        assert!(e.output_replaces_xml());

        let e = HookEvent::from_args(&["web1", "migrate", "end", "-"]).unwrap();
        assert!(!e.output_replaces_xml());

        let all = [
            ("prepare", HookOp::Prepare),
            ("start", HookOp::Start),
            ("started", HookOp::Started),
            ("stopped", HookOp::Stopped),
            ("release", HookOp::Release),
            ("migrate", HookOp::Migrate),
            ("restore", HookOp::Restore),
            ("reconnect", HookOp::Reconnect),
            ("attach", HookOp::Attach),
        ];
        for (name, op) in all {
            let e = HookEvent::from_args(&["d", name, "-", "-"]).unwrap();
            assert_eq!(e.op, op);
            assert_eq!(e.sub_op, HookSubOp::None);
            assert_eq!(e.to_args(), ["d", name, "-", "-"].map(String::from));
        }
    }

    #[test]
    fn keeps_unknown_values() {
        let e = HookEvent::from_args(&["d", "shutdown", "middle", "extra data"]).unwrap();
        assert_eq!(e.op, HookOp::Other("shutdown".into()));
        assert_eq!(e.sub_op, HookSubOp::Other("middle".into()));
        assert_eq!(e.extra.as_deref(), Some("extra data"));
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<HookEvent>(&json).unwrap(), e);
    }

    #[test]
    fn rejects_bad_argv() {
        assert_eq!(
            HookEvent::from_args(&["d", "start", "begin"]),
            Err(HookError::WrongArgCount(3))
        );
        assert_eq!(
            HookEvent::from_args::<&str>(&[]),
            Err(HookError::WrongArgCount(0))
        );
        assert_eq!(
            HookEvent::from_args(&[
                "/etc/libvirt/hooks/qemu.d/vmbeam",
                "d",
                "start",
                "begin",
                "-"
            ]),
            Err(HookError::WrongArgCount(5))
        );
        assert_eq!(
            HookEvent::from_args(&["", "start", "begin", "-"]),
            Err(HookError::EmptyObject)
        );
        assert_eq!(
            HookEvent::from_args(&["d", "", "begin", "-"]),
            Err(HookError::EmptyOp)
        );
    }
}

#[cfg(test)]
mod prop_tests {
    use proptest::prelude::*;

    use super::*;
    use crate::proptest_support::proptest_config;

    fn arg() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            Just(String::new()),
            Just("-".to_owned()),
            "(prepare|start|started|stopped|release|migrate|restore|reconnect|attach|begin|end)",
        ]
    }

    proptest! {
        #![proptest_config(proptest_config())]

        #[test]
        fn prop_hook_from_arbitrary_args_never_panics(
            args in proptest::collection::vec(arg(), 0..7),
        ) {
            match HookEvent::from_args(&args) {
                Ok(ev) => {
                    prop_assert_eq!(args.len(), 4);
                    // Libvirt's arguments come back unchanged, and parse to the same event.
                    prop_assert_eq!(ev.to_args().to_vec(), args);
                    prop_assert_eq!(HookEvent::from_args(&ev.to_args()).unwrap(), ev);
                }
                Err(_) => prop_assert!(
                    args.len() != 4 || args[0].is_empty() || args[1].is_empty()
                ),
            }
        }
    }
}
