//! The host channel's protocol: lines of ASCII over the virtio-serial port
//! `org.vmbeam.host.0` ([`HOST_CHANNEL`]) of each cloud VM, requests from the cloud VM, one
//! answer per request. Both ends use this module: `vmbeam-host` (the primary cloud's daemon,
//! the server) and vmbeamd's `hostlink` (the client inside each cloud VM). It holds only
//! pure types and functions, no I/O: the ids and the device layout both ends must agree on
//! ([`CloudVmId`], [`PciAddress`], [`control_page_offset`]), the requests and answers, and
//! the framing.
//!
//! A port is one byte stream with no framing of its own, so every message is one line
//! (`\n`, an optional `\r` before it is dropped) of at most [`MAX_LINE`] bytes. A longer line
//! is answered `- ERR line-too-long` as soon as it passes the limit and is skipped up to its
//! end. Requests start with an id of the client's choosing (decimal, up to 20 digits) that
//! the answer repeats; an answer to a line whose id could not be read carries `-`. Blank
//! lines get no answer: a cloud VM may send one to end a half line an earlier writer left
//! on the port.
//!
//! The asking cloud VM is the one whose channel the line came in on; nothing in a request
//! names the asker. Guests are named by their UUID within the asker's virtual IaaS cloud;
//! peers by their domain UUID (inside the peer, its SMBIOS system UUID, which its libvirtd
//! reports as the host UUID of its capabilities).
//!
//! | request | from | answer |
//! |---|---|---|
//! | `ID HELLO V [V…]` | any cloud VM, first on every connection | `ID OK version=1 cloud-vm=UUID cloud=CLOUD` |
//! | `ID ALLOC GUEST RAM-BYTES` | the cloud VM starting the guest | `ID OK addr=0000:00:1f.0 bar-size=N ram-offset=0 control-offset=M` |
//! | `ID COLOCATED PEER` | any | `ID OK colocated=yes`, or `ID OK colocated=no reason=not-colocated` (or `reason=self`) |
//! | `ID SHARE GUEST PEER` | the guest's owner (the migration's source) | the device's placement in PEER, as for ALLOC |
//! | `ID ACCEPT GUEST` | the share's destination, before anything there maps the device | `ID OK` (the owner can no longer UNSHARE) |
//! | `ID UNSHARE GUEST` | the owner, while the destination has not ACCEPTed (failed migration) | `ID OK` (device unplugged from the destination; the owner keeps it) |
//! | `ID RELEASE GUEST` | the owner, after its QEMU exited and nothing maps the BAR | `ID OK` (the destination becomes the owner) |
//! | `ID WITHDRAW GUEST` | the share's destination, after its QEMU exited (failed migration) | `ID OK` (the owner keeps it) |
//! | `ID FREE GUEST` | the owner, sole holder, guest destroyed for good | `ID OK` (device gone, file deleted) |
//!
//! # Who takes a share back
//!
//! A device is only unplugged from a cloud VM when nothing in that cloud VM maps it: the
//! host's unplug does not wait for users, and a process still mapping the BAR silently reads
//! zeroes. Each cloud VM can check that only for itself (`/proc/*/maps`), so a share's
//! destination WITHDRAWs it itself once its QEMU exited. The owner cannot see into the
//! destination, and the protocol has no request from the host to a cloud VM, so the host
//! cannot ask either. What makes UNSHARE safe instead is an order both sides keep: the
//! destination says ACCEPT *before* it maps the device for the first time (its proof check
//! in `migrate begin`, then QEMU), and the host decides ACCEPT and UNSHARE of one guest one
//! at a time. So either UNSHARE comes first (the device is unplugged and the destination's
//! ACCEPT is refused `not-holder`: it never mapped anything and fails libvirt's Prepare),
//! or ACCEPT comes first (UNSHARE is refused `accepted`, and the destination withdraws the
//! share itself after the failed migration, at its `release end`). "Not yet accepted" is
//! thus exactly "nothing in the destination maps it"; a destination the host cannot vouch
//! for (a share the host adopted from libvirt's view, or one recorded before ACCEPT
//! existed) counts as accepted.
//!
//! Every refusal is `ID ERR CODE TEXT` ([`ErrorCode`]) and changes nothing. A placement
//! answer means libvirt has the device in the cloud VM; the cloud VM's kernel sees it a
//! moment later (ACPI hot-plug) at `/sys/bus/pci/devices/ADDR/resource2`: guest RAM at
//! `ram-offset`, the control page at `control-offset`. The cloud VM must check that BAR 2
//! got an address (see `vmbeam_host::device` on the 64-bit PCI window) before it maps it.
//!
//! A cloud VM on this host that belongs to another cloud is reported exactly like one that
//! is not on this host (`not-colocated`): a cloud VM learns nothing about other clouds'
//! cloud VMs, not even that a UUID runs here.
//!
//! Framing ([`Framer`]) and parsing are pure functions; the cloud VM's side of the protocol
//! (`Request::to_line`, [`parse_answer`]) lives here too.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{CloudId, DomainUuid};

/// The name of the host channel's virtio-serial port (inside a cloud VM, with udev:
/// `/dev/virtio-ports/org.vmbeam.host.0`).
pub const HOST_CHANNEL: &str = "org.vmbeam.host.0";

/// A cloud VM's identity: its domain UUID in the primary cloud's libvirt (inside the cloud
/// VM, its SMBIOS system UUID, which its libvirtd reports as the host UUID).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CloudVmId(pub DomainUuid);

impl fmt::Display for CloudVmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The control page at the end of every shared device's BAR.
pub const CONTROL_PAGE: u64 = 4096;

/// The control page's offset in a BAR of `bar_size` bytes: its last page.
pub fn control_page_offset(bar_size: u64) -> u64 {
    bar_size - CONTROL_PAGE
}

/// A PCI address, written as sysfs names devices (`0000:00:1f.0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PciAddress {
    /// PCI domain (segment).
    pub domain: u16,
    /// Bus number.
    pub bus: u8,
    /// Slot (device) number, 0..=0x1f.
    pub slot: u8,
    /// Function number, 0..=7.
    pub function: u8,
}

impl PciAddress {
    /// Function 0 of `slot` on bus 0 of domain 0, where VMBeam puts its devices.
    pub fn root_slot(slot: u8) -> Self {
        Self {
            domain: 0,
            bus: 0,
            slot,
            function: 0,
        }
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.slot, self.function
        )
    }
}

/// A string that is not a PCI address in sysfs form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a PCI address of the form 0000:00:1f.0")]
pub struct BadAddress(pub String);

impl FromStr for PciAddress {
    type Err = BadAddress;

    fn from_str(s: &str) -> Result<Self, BadAddress> {
        let bad = || BadAddress(s.to_owned());
        let hex = |part: &str, len: usize| {
            (part.len() == len && part.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| u32::from_str_radix(part, 16).ok())
                .flatten()
                .ok_or_else(bad)
        };
        let (domain, rest) = s.split_once(':').ok_or_else(bad)?;
        let (bus, rest) = rest.split_once(':').ok_or_else(bad)?;
        let (slot, function) = rest.split_once('.').ok_or_else(bad)?;
        let (domain, bus, slot, function) = (
            hex(domain, 4)?,
            hex(bus, 2)?,
            hex(slot, 2)?,
            hex(function, 1)?,
        );
        if slot > 0x1f || function > 7 {
            return Err(bad());
        }
        Ok(Self {
            domain: domain as u16,
            bus: bus as u8,
            slot: slot as u8,
            function: function as u8,
        })
    }
}

impl TryFrom<String> for PciAddress {
    type Error = BadAddress;
    fn try_from(s: String) -> Result<Self, BadAddress> {
        s.parse()
    }
}

impl From<PciAddress> for String {
    fn from(a: PciAddress) -> String {
        a.to_string()
    }
}

/// The protocol version this host speaks.
pub const VERSION: u32 = 1;
/// The longest line, without its `\n`.
pub const MAX_LINE: usize = 512;
/// The longest error text in an answer.
const MAX_TEXT: usize = 400;

/// A request's id, chosen by the cloud VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Opens the conversation: the versions the cloud VM speaks.
    Hello {
        /// Versions, in the client's order.
        versions: Vec<u32>,
    },
    /// An operation on guests or peers.
    Op(Op),
}

/// An operation a cloud VM asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A guest starts here: create its file and plug its device into the asker.
    Alloc {
        /// The guest.
        guest: DomainUuid,
        /// Its RAM in bytes.
        ram_bytes: u64,
    },
    /// Is the peer a cloud VM of the asker's cloud on this host?
    Colocated {
        /// The peer.
        peer: CloudVmId,
    },
    /// Plug the guest's device into the peer too (migration's start).
    Share {
        /// The guest.
        guest: DomainUuid,
        /// The destination.
        peer: CloudVmId,
    },
    /// The share's destination takes the share: from now on it may map the device, and
    /// the owner can no longer [`Op::Unshare`] it (sent before the first mapping).
    Accept {
        /// The guest.
        guest: DomainUuid,
    },
    /// The owner takes back a share its destination has not accepted: the device is
    /// unplugged from the destination (a migration that failed before the destination's
    /// `migrate begin`).
    Unshare {
        /// The guest.
        guest: DomainUuid,
    },
    /// Unplug the guest's device from the asker, the owner (migration's end).
    Release {
        /// The guest.
        guest: DomainUuid,
    },
    /// Unplug the guest's device from the asker, the share's destination (failed migration).
    Withdraw {
        /// The guest.
        guest: DomainUuid,
    },
    /// Unplug the guest's device from the asker, its only holder, and delete its file.
    Free {
        /// The guest.
        guest: DomainUuid,
    },
}

impl Op {
    /// The request's verb.
    pub fn verb(&self) -> &'static str {
        match self {
            Self::Alloc { .. } => "ALLOC",
            Self::Colocated { .. } => "COLOCATED",
            Self::Share { .. } => "SHARE",
            Self::Accept { .. } => "ACCEPT",
            Self::Unshare { .. } => "UNSHARE",
            Self::Release { .. } => "RELEASE",
            Self::Withdraw { .. } => "WITHDRAW",
            Self::Free { .. } => "FREE",
        }
    }

    /// The guest the operation is about.
    pub fn guest(&self) -> Option<&DomainUuid> {
        match self {
            Self::Alloc { guest, .. }
            | Self::Share { guest, .. }
            | Self::Accept { guest }
            | Self::Unshare { guest }
            | Self::Release { guest }
            | Self::Withdraw { guest }
            | Self::Free { guest } => Some(guest),
            Self::Colocated { .. } => None,
        }
    }

    /// The peer the operation names.
    pub fn peer(&self) -> Option<&CloudVmId> {
        match self {
            Self::Colocated { peer } | Self::Share { peer, .. } => Some(peer),
            _ => None,
        }
    }
}

impl Request {
    /// The request as the cloud VM sends it (without the `\n`).
    pub fn to_line(&self, id: RequestId) -> String {
        match self {
            Self::Hello { versions } => {
                let v: Vec<String> = versions.iter().map(u32::to_string).collect();
                format!("{id} HELLO {}", v.join(" "))
            }
            Self::Op(op) => {
                let verb = op.verb();
                match op {
                    Op::Alloc { guest, ram_bytes } => format!("{id} {verb} {guest} {ram_bytes}"),
                    Op::Colocated { peer } => format!("{id} {verb} {peer}"),
                    Op::Share { guest, peer } => format!("{id} {verb} {guest} {peer}"),
                    Op::Accept { guest }
                    | Op::Unshare { guest }
                    | Op::Release { guest }
                    | Op::Withdraw { guest }
                    | Op::Free { guest } => {
                        format!("{id} {verb} {guest}")
                    }
                }
            }
        }
    }
}

/// A line that is not a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct BadRequest {
    /// The request's id, when it could be read.
    pub id: Option<RequestId>,
    /// Why the line is not a request.
    pub reason: String,
}

/// A decimal number without sign or spaces, as ids and sizes are written.
fn decimal<T: FromStr>(s: &str) -> Option<T> {
    (!s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// Parses one line (without its `\n`).
pub fn parse_request(line: &str) -> Result<(RequestId, Request), BadRequest> {
    let mut words = line.split_ascii_whitespace();
    let bad = |id, reason: String| BadRequest { id, reason };
    let first = words.next().ok_or_else(|| bad(None, "empty line".into()))?;
    let id = RequestId(
        decimal(first)
            .ok_or_else(|| bad(None, format!("'{}' is not a request id", clip(first))))?,
    );
    let verb = words
        .next()
        .ok_or_else(|| bad(Some(id), "no request after the id".into()))?;
    let args: Vec<&str> = words.collect();
    let arity = |n: usize, usage: &str| {
        if args.len() == n {
            Ok(())
        } else {
            Err(bad(Some(id), format!("usage: ID {verb} {usage}")))
        }
    };
    let guest = |s: &str| {
        DomainUuid::new(s).map_err(|_| bad(Some(id), format!("'{}' is not a guest UUID", clip(s))))
    };
    let peer = |s: &str| {
        DomainUuid::new(s)
            .map(CloudVmId)
            .map_err(|_| bad(Some(id), format!("'{}' is not a cloud VM UUID", clip(s))))
    };
    let op = match verb {
        "HELLO" => {
            if args.is_empty() || args.len() > 16 {
                return Err(bad(Some(id), "usage: ID HELLO VERSION [VERSION…]".into()));
            }
            let versions = args
                .iter()
                .map(|v| {
                    decimal(v)
                        .ok_or_else(|| bad(Some(id), format!("'{}' is not a version", clip(v))))
                })
                .collect::<Result<_, _>>()?;
            return Ok((id, Request::Hello { versions }));
        }
        "ALLOC" => {
            arity(2, "GUEST-UUID RAM-BYTES")?;
            let ram_bytes = decimal(args[1])
                .ok_or_else(|| bad(Some(id), format!("'{}' is not a byte count", clip(args[1]))))?;
            Op::Alloc {
                guest: guest(args[0])?,
                ram_bytes,
            }
        }
        "COLOCATED" => {
            arity(1, "PEER-CLOUD-VM-UUID")?;
            Op::Colocated {
                peer: peer(args[0])?,
            }
        }
        "SHARE" => {
            arity(2, "GUEST-UUID PEER-CLOUD-VM-UUID")?;
            Op::Share {
                guest: guest(args[0])?,
                peer: peer(args[1])?,
            }
        }
        "ACCEPT" => {
            arity(1, "GUEST-UUID")?;
            Op::Accept {
                guest: guest(args[0])?,
            }
        }
        "UNSHARE" => {
            arity(1, "GUEST-UUID")?;
            Op::Unshare {
                guest: guest(args[0])?,
            }
        }
        "RELEASE" => {
            arity(1, "GUEST-UUID")?;
            Op::Release {
                guest: guest(args[0])?,
            }
        }
        "WITHDRAW" => {
            arity(1, "GUEST-UUID")?;
            Op::Withdraw {
                guest: guest(args[0])?,
            }
        }
        "FREE" => {
            arity(1, "GUEST-UUID")?;
            Op::Free {
                guest: guest(args[0])?,
            }
        }
        other => return Err(bad(Some(id), format!("unknown request '{}'", clip(other)))),
    };
    Ok((id, Request::Op(op)))
}

/// At most 40 characters of what the client sent, for an error text.
fn clip(s: &str) -> String {
    s.chars().take(40).collect()
}

/// Where a guest's device sits in one cloud VM, and its layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The device's PCI address in that cloud VM.
    pub addr: PciAddress,
    /// BAR 2's size in bytes.
    pub bar_size: u64,
    /// Where the guest's RAM starts in the BAR (always 0).
    pub ram_offset: u64,
    /// Where the control page starts in the BAR (its last page).
    pub control_offset: u64,
}

impl Placement {
    /// The placement of a BAR of `bar_size` at `addr`.
    pub fn new(addr: PciAddress, bar_size: u64) -> Self {
        Self {
            addr,
            bar_size,
            ram_offset: 0,
            control_offset: control_page_offset(bar_size),
        }
    }
}

/// Why COLOCATED says no.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoReason {
    /// The peer is no cloud VM of the asker's cloud on this host.
    NotColocated,
    /// The peer is the asker itself.
    SelfPeer,
}

impl NoReason {
    fn as_str(self) -> &'static str {
        match self {
            Self::NotColocated => "not-colocated",
            Self::SelfPeer => "self",
        }
    }
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// HELLO's answer: the version chosen and who the asker is to the host.
    Hello {
        /// The version both speak.
        version: u32,
        /// The asker's id.
        cloud_vm: CloudVmId,
        /// The asker's cloud.
        cloud: CloudId,
    },
    /// ALLOC's and SHARE's answer.
    Placed(Placement),
    /// COLOCATED's answer.
    Colocated(Result<(), NoReason>),
    /// ACCEPT's, UNSHARE's, RELEASE's, WITHDRAW's and FREE's answer.
    Done,
}

/// The refusal and failure codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The line is not a request.
    BadRequest,
    /// The line is longer than [`MAX_LINE`].
    LineTooLong,
    /// An operation before HELLO on this connection.
    HelloFirst,
    /// No version in HELLO is one this host speaks.
    UnsupportedVersion,
    /// The asker is no usable VMBeam cloud VM for the host right now.
    NotReady,
    /// The peer is no cloud VM of the asker's cloud on this host.
    NotColocated,
    /// The asker's cloud has no such guest here.
    UnknownGuest,
    /// The asker does not hold the guest.
    NotHolder,
    /// The asker holds the guest in the other role (owner vs the share's destination).
    WrongRole,
    /// RELEASE would leave the guest with no holder.
    LastHolder,
    /// Another operation on the guest is in progress, or the guest is shared.
    Busy,
    /// UNSHARE of a share its destination has accepted (it may map the device): the
    /// destination withdraws it.
    Accepted,
    /// The guest, or its file, exists already.
    Exists,
    /// The device does not fit the cloud VM's 64-bit PCI window.
    WindowFull,
    /// The cloud VM has no free PCI slot for the device.
    NoFreeSlot,
    /// The RAM size cannot get a device.
    BadSize,
    /// libvirt or the file system failed; the text says what is left.
    Failed,
}

impl ErrorCode {
    const ALL: [ErrorCode; 17] = [
        Self::BadRequest,
        Self::LineTooLong,
        Self::HelloFirst,
        Self::UnsupportedVersion,
        Self::NotReady,
        Self::NotColocated,
        Self::UnknownGuest,
        Self::NotHolder,
        Self::WrongRole,
        Self::LastHolder,
        Self::Busy,
        Self::Accepted,
        Self::Exists,
        Self::WindowFull,
        Self::NoFreeSlot,
        Self::BadSize,
        Self::Failed,
    ];

    /// The code on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad-request",
            Self::LineTooLong => "line-too-long",
            Self::HelloFirst => "hello-first",
            Self::UnsupportedVersion => "unsupported-version",
            Self::NotReady => "not-ready",
            Self::NotColocated => "not-colocated",
            Self::UnknownGuest => "unknown-guest",
            Self::NotHolder => "not-holder",
            Self::WrongRole => "wrong-role",
            Self::LastHolder => "last-holder",
            Self::Busy => "busy",
            Self::Accepted => "accepted",
            Self::Exists => "exists",
            Self::WindowFull => "window-full",
            Self::NoFreeSlot => "no-free-slot",
            Self::BadSize => "bad-size",
            Self::Failed => "failed",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ErrorCode {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Self::ALL.into_iter().find(|c| c.as_str() == s).ok_or(())
    }
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Success.
    Ok(Reply),
    /// Refusal or failure.
    Err {
        /// What kind.
        code: ErrorCode,
        /// For people.
        text: String,
    },
}

impl Answer {
    /// A refusal or failure with `text` (control characters blanked, cut to 400 bytes).
    pub fn err(code: ErrorCode, text: impl AsRef<str>) -> Self {
        let mut clean = String::new();
        for c in text.as_ref().chars() {
            if clean.len() + c.len_utf8() > MAX_TEXT {
                break;
            }
            clean.push(if c.is_control() { ' ' } else { c });
        }
        Self::Err {
            code,
            text: clean.trim().to_owned(),
        }
    }

    /// The answer's line (without the `\n`); `id` is `None` when the request's id was
    /// unreadable.
    pub fn to_line(&self, id: Option<RequestId>) -> String {
        let id = id.map_or_else(|| "-".to_owned(), |i| i.to_string());
        match self {
            Self::Ok(Reply::Hello {
                version,
                cloud_vm,
                cloud,
            }) => format!("{id} OK version={version} cloud-vm={cloud_vm} cloud={cloud}"),
            Self::Ok(Reply::Placed(p)) => format!(
                "{id} OK addr={} bar-size={} ram-offset={} control-offset={}",
                p.addr, p.bar_size, p.ram_offset, p.control_offset
            ),
            Self::Ok(Reply::Colocated(Ok(()))) => format!("{id} OK colocated=yes"),
            Self::Ok(Reply::Colocated(Err(r))) => {
                format!("{id} OK colocated=no reason={}", r.as_str())
            }
            Self::Ok(Reply::Done) => format!("{id} OK"),
            Self::Err { code, text } if text.is_empty() => format!("{id} ERR {}", code.as_str()),
            Self::Err { code, text } => format!("{id} ERR {} {text}", code.as_str()),
        }
    }
}

/// A line that is not an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an answer: {0}")]
pub struct BadAnswer(String);

/// Parses an answer line (the cloud VM's side).
pub fn parse_answer(line: &str) -> Result<(Option<RequestId>, Answer), BadAnswer> {
    let bad = |why: &str| BadAnswer(why.to_owned());
    let (id, rest) = line.split_once(' ').ok_or_else(|| bad("no status"))?;
    let id = match id {
        "-" => None,
        digits => Some(RequestId(decimal(digits).ok_or_else(|| bad("bad id"))?)),
    };
    if let Some(err) = rest.strip_prefix("ERR ") {
        let (code, text) = err.split_once(' ').unwrap_or((err, ""));
        let code = code.parse().map_err(|_| bad("unknown error code"))?;
        return Ok((
            id,
            Answer::Err {
                code,
                text: text.to_owned(),
            },
        ));
    }
    let fields = match rest {
        "OK" => return Ok((id, Answer::Ok(Reply::Done))),
        _ => rest
            .strip_prefix("OK ")
            .ok_or_else(|| bad("neither OK nor ERR"))?,
    };
    let mut map = std::collections::BTreeMap::new();
    for field in fields.split(' ') {
        let (k, v) = field
            .split_once('=')
            .ok_or_else(|| bad("field without '='"))?;
        if map.insert(k, v).is_some() {
            return Err(bad("repeated field"));
        }
    }
    let get = |k: &str| map.get(k).copied().ok_or_else(|| bad("missing field"));
    let num = |k: &str| get(k).and_then(|v| decimal::<u64>(v).ok_or_else(|| bad("bad number")));
    let reply = if map.contains_key("version") {
        Reply::Hello {
            version: decimal(get("version")?).ok_or_else(|| bad("bad version"))?,
            cloud_vm: CloudVmId(
                DomainUuid::new(get("cloud-vm")?).map_err(|_| bad("bad cloud-vm"))?,
            ),
            cloud: CloudId::new(get("cloud")?).map_err(|_| bad("bad cloud"))?,
        }
    } else if map.contains_key("addr") {
        Reply::Placed(Placement {
            addr: get("addr")?.parse().map_err(|_| bad("bad addr"))?,
            bar_size: num("bar-size")?,
            ram_offset: num("ram-offset")?,
            control_offset: num("control-offset")?,
        })
    } else {
        match (get("colocated")?, map.get("reason").copied()) {
            ("yes", None) => Reply::Colocated(Ok(())),
            ("no", Some("not-colocated")) => Reply::Colocated(Err(NoReason::NotColocated)),
            ("no", Some("self")) => Reply::Colocated(Err(NoReason::SelfPeer)),
            _ => return Err(bad("bad colocated answer")),
        }
    };
    Ok((id, Answer::Ok(reply)))
}

/// One unit the [`Framer`] cut from the byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A complete line (without `\n` and a `\r` before it).
    Line(String),
    /// A line passed [`MAX_LINE`]; its bytes up to its `\n` are dropped.
    TooLong,
    /// A complete line that is not UTF-8.
    NotUtf8,
}

/// Cuts a byte stream into [`Frame`]s, keeping at most [`MAX_LINE`] bytes buffered.
#[derive(Debug, Default)]
pub struct Framer {
    buf: Vec<u8>,
    skipping: bool,
}

impl Framer {
    /// Feeds `bytes`; complete frames are appended to `out`.
    pub fn push(&mut self, mut bytes: &[u8], out: &mut Vec<Frame>) {
        while !bytes.is_empty() {
            let newline = bytes.iter().position(|&b| b == b'\n');
            let (chunk, rest) = match newline {
                Some(i) => (&bytes[..i], &bytes[i + 1..]),
                None => (bytes, &[][..]),
            };
            bytes = rest;
            if !self.skipping {
                if self.buf.len() + chunk.len() > MAX_LINE + 1 {
                    // One byte of slack for a '\r' before the '\n'.
                    self.buf.clear();
                    self.skipping = true;
                    out.push(Frame::TooLong);
                } else {
                    self.buf.extend_from_slice(chunk);
                }
            }
            if newline.is_some() {
                if self.skipping {
                    self.skipping = false;
                } else {
                    let mut line = std::mem::take(&mut self.buf);
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    out.push(if line.len() > MAX_LINE {
                        Frame::TooLong
                    } else {
                        String::from_utf8(line).map_or(Frame::NotUtf8, Frame::Line)
                    });
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const G: &str = "6e3b1e9a-1b2c-4d5e-8f90-0123456789ab";
    pub(crate) const P: &str = "5f0c2b5e-1a2b-4c3d-8e4f-00000000000b";

    fn uuid(s: &str) -> DomainUuid {
        DomainUuid::new(s).unwrap()
    }

    #[test]
    fn parses_every_request() {
        let cases = [
            ("1 HELLO 1", Request::Hello { versions: vec![1] }),
            (
                "2 HELLO 3 1 2",
                Request::Hello {
                    versions: vec![3, 1, 2],
                },
            ),
            (
                &format!("3 ALLOC {G} 268435456") as &str,
                Request::Op(Op::Alloc {
                    guest: uuid(G),
                    ram_bytes: 268435456,
                }),
            ),
            (
                &format!("4 COLOCATED {P}"),
                Request::Op(Op::Colocated {
                    peer: CloudVmId(uuid(P)),
                }),
            ),
            (
                &format!("5 SHARE {G} {P}"),
                Request::Op(Op::Share {
                    guest: uuid(G),
                    peer: CloudVmId(uuid(P)),
                }),
            ),
            (
                &format!("6 RELEASE {G}"),
                Request::Op(Op::Release { guest: uuid(G) }),
            ),
            (
                &format!("7 WITHDRAW {G}"),
                Request::Op(Op::Withdraw { guest: uuid(G) }),
            ),
            (
                &format!("8 ACCEPT {G}"),
                Request::Op(Op::Accept { guest: uuid(G) }),
            ),
            (
                &format!("9 UNSHARE {G}"),
                Request::Op(Op::Unshare { guest: uuid(G) }),
            ),
            (
                &format!("18446744073709551615 FREE {G}"),
                Request::Op(Op::Free { guest: uuid(G) }),
            ),
        ];
        for (line, want) in cases {
            let (id, got) = parse_request(line).unwrap();
            assert_eq!(got, want, "{line}");
            assert_eq!(got.to_line(id), line);
        }
        // Upper-case UUIDs are accepted and normalised.
        let (_, r) = parse_request(&format!("1 RELEASE {}", G.to_uppercase())).unwrap();
        assert_eq!(r, Request::Op(Op::Release { guest: uuid(G) }));
    }

    #[test]
    fn refuses_what_is_not_a_request_with_the_id_when_it_has_one() {
        let cases: [(&str, Option<u64>, &str); 12] = [
            ("", None, "empty line"),
            ("   ", None, "empty line"),
            ("x ALLOC", None, "not a request id"),
            ("-1 HELLO 1", None, "not a request id"),
            ("184467440737095516150 HELLO 1", None, "not a request id"),
            ("7", Some(7), "no request"),
            ("7 hello 1", Some(7), "unknown request"),
            ("7 HELLO", Some(7), "usage"),
            ("7 HELLO x", Some(7), "not a version"),
            ("7 ALLOC nope 4096", Some(7), "not a guest UUID"),
            ("7 RELEASE", Some(7), "usage"),
            ("7 COLOCATED 1 2", Some(7), "usage"),
        ];
        for (line, id, why) in cases {
            let e = parse_request(line).unwrap_err();
            assert_eq!(e.id, id.map(RequestId), "{line}");
            assert!(e.reason.contains(why), "{line}: {}", e.reason);
        }
        let e = parse_request(&format!("7 ALLOC {G} -5")).unwrap_err();
        assert!(e.reason.contains("byte count"));
    }

    #[test]
    fn answers_print_and_parse_back() {
        let addr = PciAddress::root_slot(0x1f);
        let answers = [
            Answer::Ok(Reply::Hello {
                version: 1,
                cloud_vm: CloudVmId(uuid(P)),
                cloud: CloudId::new("acme").unwrap(),
            }),
            Answer::Ok(Reply::Placed(Placement::new(addr, 1 << 31))),
            Answer::Ok(Reply::Colocated(Ok(()))),
            Answer::Ok(Reply::Colocated(Err(NoReason::NotColocated))),
            Answer::Ok(Reply::Colocated(Err(NoReason::SelfPeer))),
            Answer::Ok(Reply::Done),
            Answer::err(ErrorCode::Busy, "a share to cvm2 is in place"),
            Answer::err(ErrorCode::Failed, ""),
        ];
        for a in answers {
            for id in [None, Some(RequestId(9))] {
                let line = a.to_line(id);
                assert_eq!(parse_answer(&line).unwrap(), (id, a.clone()), "{line}");
            }
        }
        assert_eq!(
            Answer::Ok(Reply::Placed(Placement::new(addr, 1 << 31))).to_line(Some(RequestId(3))),
            "3 OK addr=0000:00:1f.0 bar-size=2147483648 ram-offset=0 control-offset=2147479552"
        );
        for code in ErrorCode::ALL {
            assert_eq!(code.as_str().parse(), Ok(code));
        }
        for bad in [
            "",
            "1",
            "1 MAYBE",
            "x OK",
            "1 OK a",
            "1 OK colocated=perhaps",
            "1 ERR nope x",
            "1 OK addr=0000:00:1f.0",
        ] {
            assert!(parse_answer(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn error_texts_stay_on_one_line_and_short() {
        let Answer::Err { text, .. } = Answer::err(ErrorCode::Failed, "a\nb\r\x07c") else {
            unreachable!()
        };
        assert_eq!(text, "a b  c");
        let Answer::Err { text, .. } = Answer::err(ErrorCode::Failed, "é".repeat(300)) else {
            unreachable!()
        };
        assert!(text.len() <= 400 && text.chars().all(|c| c == 'é'));
    }

    fn frames(chunks: &[&[u8]]) -> Vec<Frame> {
        let mut f = Framer::default();
        let mut out = Vec::new();
        for c in chunks {
            f.push(c, &mut out);
        }
        out
    }

    #[test]
    fn framer_cuts_lines_and_bounds_them() {
        assert_eq!(
            frames(&[b"1 HEL", b"LO 1\r\n2 A", b"\n\n"]),
            vec![
                Frame::Line("1 HELLO 1".into()),
                Frame::Line("2 A".into()),
                Frame::Line(String::new())
            ]
        );
        let long = vec![b'x'; MAX_LINE + 1];
        let mut exact = vec![b'y'; MAX_LINE];
        exact.push(b'\n');
        assert_eq!(
            frames(&[&long, &long, b"tail\nok\n", &exact]),
            vec![
                Frame::TooLong,
                Frame::Line("ok".into()),
                Frame::Line("y".repeat(MAX_LINE))
            ]
        );
        // MAX_LINE + 1 bytes and then '\n': too long, reported once.
        let mut over = vec![b'z'; MAX_LINE + 1];
        over.push(b'\n');
        assert_eq!(frames(&[&over]), vec![Frame::TooLong]);
        assert_eq!(frames(&[b"\xff\xfe\n"]), vec![Frame::NotUtf8]);
        // An unfinished line is not a frame.
        assert_eq!(frames(&[b"1 HELLO 1"]), vec![]);
    }
}

#[cfg(test)]
mod prop_tests {
    use crate::proptest_support::proptest_config;
    use proptest::prelude::*;

    use super::tests::{G, P};
    use super::*;

    proptest! {
        #![proptest_config(proptest_config())]

        #[test]
        fn prop_protocol_arbitrary_lines_never_panic(line in any::<String>()) {
            let _ = parse_request(&line);
            let _ = parse_answer(&line);
        }

        #[test]
        fn prop_protocol_requestish_lines_never_panic(
            line in "[0-9]{0,3} (HELLO|ALLOC|COLOCATED|SHARE|ACCEPT|UNSHARE|RELEASE|WITHDRAW|FREE|X)( [0-9a-fA-F-]{0,40}){0,3}"
        ) {
            if let Ok((id, req)) = parse_request(&line) {
                // What parses prints back to something that parses to itself.
                prop_assert_eq!(parse_request(&req.to_line(id)).unwrap(), (id, req));
            }
        }

        #[test]
        fn prop_protocol_framing_ignores_chunking(
            lines in proptest::collection::vec("[ -~]{0,600}", 0..8),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let mut stream = Vec::new();
            for l in &lines {
                stream.extend_from_slice(l.as_bytes());
                stream.push(b'\n');
            }
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
            points.sort_unstable();
            let mut framer = Framer::default();
            let mut got = Vec::new();
            let mut at = 0;
            for p in points.into_iter().chain([stream.len()]) {
                framer.push(&stream[at..p], &mut got);
                at = p;
            }
            let want: Vec<Frame> = lines
                .iter()
                .map(|l| if l.len() > MAX_LINE { Frame::TooLong } else { Frame::Line(l.clone()) })
                .collect();
            prop_assert_eq!(got, want);
        }

        #[test]
        fn prop_protocol_requests_round_trip(
            id in any::<u64>(),
            ram in any::<u64>(),
            which in 0u8..9,
            versions in proptest::collection::vec(any::<u32>(), 1..5),
        ) {
            let g = DomainUuid::new(G).unwrap();
            let p = CloudVmId(DomainUuid::new(P).unwrap());
            let req = match which {
                0 => Request::Hello { versions },
                1 => Request::Op(Op::Alloc { guest: g, ram_bytes: ram }),
                2 => Request::Op(Op::Colocated { peer: p }),
                3 => Request::Op(Op::Share { guest: g, peer: p }),
                4 => Request::Op(Op::Release { guest: g }),
                5 => Request::Op(Op::Withdraw { guest: g }),
                6 => Request::Op(Op::Accept { guest: g }),
                7 => Request::Op(Op::Unshare { guest: g }),
                _ => Request::Op(Op::Free { guest: g }),
            };
            let line = req.to_line(RequestId(id));
            prop_assert!(line.len() <= MAX_LINE);
            prop_assert_eq!(parse_request(&line).unwrap(), (RequestId(id), req));
        }
    }
}
