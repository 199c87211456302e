//! vmbeamd's client of the host channel: the cloud VM's end of the line protocol that
//! `vmbeam-host`, the primary cloud's daemon, answers on the virtio-serial port
//! `org.vmbeam.host.0` of every cloud VM (the protocol, pure: `vmbeam_core::host_protocol`).
//!
//! Not wired into the migration engine yet (issue 13, item 2). Where each call belongs in
//! the paper's flow, with cloud VMs that are real VMs and a guest's RAM on a hot-plugged
//! `ivshmem-plain` device (BAR 2, `/sys/bus/pci/devices/ADDR/resource2`):
//!
//! 1. **Guest start** ([`HostLink::alloc`]): the cloud VM starting a beam-enabled guest asks
//!    for its memory; the host creates the guest's file and plugs its device in here. The
//!    answer's [`Placement`] says where: the guest's RAM at `ram_offset` (0), the control
//!    page at `control_offset` (the BAR's last page, bar size − 4096). The cloud VM's kernel
//!    sees the device a moment later (ACPI hot-plug) and must check that BAR 2 got an address
//!    before QEMU maps it (withdraw or free it otherwise).
//! 2. **Before any zero-copy step** ([`HostLink::colocated`], then [`HostLink::share`]): the
//!    source asks whether the destination is a cloud VM of its cloud on this host (the
//!    host's answer replaces the one-kernel co-location check), has the device plugged into
//!    the destination too, and then proves that both see the same bytes (a content proof
//!    through the control page) before the destination QEMU starts with `-incoming` and
//!    libvirt's own job moves the guest with `x-ignore-shared`.
//! 3. **After a successful migration** ([`HostLink::release`]): the source releases only
//!    once its QEMU has exited and nothing in the source cloud VM maps the BAR. The host's
//!    unplug does not wait for users: a process still mapping it silently reads zeroes. The
//!    destination is the owner from then on.
//! 4. **After a failed migration** ([`HostLink::withdraw`]): the destination withdraws its
//!    share once its QEMU has exited; the guest goes on at the source, which still owns it.
//!    The destination says [`HostLink::accept`] before it first maps the device (its
//!    `migrate begin`); until then the owner may take the share back itself
//!    ([`HostLink::unshare`]: a migration that failed before the destination's hook ran).
//! 5. **Guest destroyed for good** ([`HostLink::free`]): its owner, sole holder, gives the
//!    memory back; the device is unplugged and the host's file deleted.
//!
//! # The link
//!
//! [`HostLink::open`] opens the channel (a unix socket is connected to, anything else, the
//! port's character device, is opened read-write), ends a half line an earlier writer may
//! have left on the port with a blank line (the protocol ignores blank lines) and says HELLO.
//! Every call then sends one request and waits for the answer that carries its id, for at
//! most the link's timeout (poll on the descriptor, for writing too: a virtio-serial port
//! blocks writers while the host side is not connected). Lines that are not that answer
//! (late answers to earlier requests, answers to someone else's garbage, which carry `-`,
//! lines that are not answers) are skipped.
//!
//! Ids start from the wall clock in nanoseconds and go up by one per request, so answers
//! meant for an earlier connection on the same port (a link that timed out, a vmbeamd that
//! restarted) never match a request of this one (unless the wall clock went back by more
//! than the time since that connection).
//!
//! Blocking, std only (plus `poll`): vmbeamd runs its blocking work on its own threads. A
//! virtio-serial port has one opener at a time, so vmbeamd keeps one link and serialises
//! the calls on it.
//!
//! # Errors and reconnecting
//!
//! A refusal (`ID ERR CODE TEXT`) is [`HostLinkError::Refused`] with the protocol's
//! [`ErrorCode`]: the host changed nothing (for `failed`, its text says what is left) and
//! the link stays usable. A timeout
//! ([`HostLinkError::Timeout`]) leaves the link usable too (a late answer is skipped by its
//! id), but the operation's outcome is unknown: the host may still carry it out, so the
//! caller asks again (ALLOC repeated is answered with the same placement; a repeated
//! RELEASE, WITHDRAW or FREE that had already been carried out is refused, e.g.
//! `not-holder` or `unknown-guest`). One `HostLink` value is one connection: after an I/O
//! error or a closed channel ([`HostLinkError::needs_reconnect`]) it is dead, and the caller
//! drops it and opens a new one.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vmbeam_core::host_protocol::{
    parse_answer, Answer, CloudVmId, ErrorCode, Frame, Framer, NoReason, Op, Placement, Reply,
    Request, RequestId, HOST_CHANNEL, VERSION,
};
use vmbeam_core::{CloudId, DomainUuid};

/// Where the host channel is inside a cloud VM (udev's name for the virtio-serial port).
pub fn default_path() -> PathBuf {
    Path::new("/dev/virtio-ports").join(HOST_CHANNEL)
}

/// How long a call waits for its answer unless told otherwise: ALLOC, SHARE and RELEASE
/// wait for the host's libvirt to hot-plug or unplug a device (an unplug alone may take the
/// host 10 s to confirm).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// What a call to the host can end in besides its answer.
#[derive(Debug, thiserror::Error)]
pub enum HostLinkError {
    /// The channel cannot be opened (no such port, not connected, busy).
    #[error("cannot open the host channel {}", path.display())]
    Open {
        /// The channel's path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading or writing the channel failed; the link is dead.
    #[error("host channel I/O failed during {verb}")]
    Io {
        /// The request's verb.
        verb: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The host closed the channel (for a virtio-serial port: the host side is not
    /// connected); the link is dead.
    #[error("the host closed the channel during {verb}")]
    Closed {
        /// The request's verb.
        verb: &'static str,
    },
    /// No answer in time. The link is usable; the request's outcome is unknown.
    #[error("no answer from the host to {verb} within {after:?}")]
    Timeout {
        /// The request's verb.
        verb: &'static str,
        /// The timeout.
        after: Duration,
    },
    /// The host refused or failed the request and changed nothing (`ID ERR CODE TEXT`).
    #[error("the host refused {verb}: {code}: {text}")]
    Refused {
        /// The request's verb.
        verb: &'static str,
        /// The protocol's code.
        code: ErrorCode,
        /// The host's words.
        text: String,
    },
    /// The answer carrying the request's id is not one the request can have (not an
    /// answer at all, or one of another request's kind).
    #[error("the host's answer to {verb} makes no sense: {line}")]
    BadAnswer {
        /// The request's verb.
        verb: &'static str,
        /// The answer line.
        line: String,
    },
}

impl HostLinkError {
    /// The protocol's code of a refusal.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether the link is dead: the caller drops it and opens a new one.
    pub fn needs_reconnect(&self) -> bool {
        matches!(
            self,
            Self::Open { .. } | Self::Io { .. } | Self::Closed { .. }
        )
    }
}

/// COLOCATED's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Colocation {
    /// The peer is a cloud VM of this cloud VM's cloud on the same host.
    Yes,
    /// It is not (or is this cloud VM itself); another cloud's cloud VM looks absent.
    No(NoReason),
}

impl Colocation {
    /// Whether the peer is co-located.
    pub fn is_yes(self) -> bool {
        self == Self::Yes
    }
}

/// What HELLO told: the version both ends speak and who this cloud VM is to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// The protocol version.
    pub version: u32,
    /// This cloud VM's id (its domain UUID in the host's libvirt).
    pub cloud_vm: CloudVmId,
    /// This cloud VM's virtual IaaS cloud, as the host knows it.
    pub cloud: CloudId,
}

/// One connection to the host channel (see the module docs).
#[derive(Debug)]
pub struct HostLink {
    channel: Channel,
    greeting: Greeting,
}

impl HostLink {
    /// Opens the host channel at `path` (see [`default_path`]) and says HELLO; every call,
    /// HELLO included, waits at most `timeout` for its answer.
    pub fn open(path: impl AsRef<Path>, timeout: Duration) -> Result<Self, HostLinkError> {
        let mut channel = Channel::open(path.as_ref(), timeout)?;
        let deadline = Instant::now() + timeout;
        // The blank line ends whatever half line an earlier writer left on the port.
        channel.write_all("HELLO", b"\n", deadline)?;
        let hello = Request::Hello {
            versions: vec![VERSION],
        };
        match channel.call_until(hello, deadline)? {
            (
                Reply::Hello {
                    version,
                    cloud_vm,
                    cloud,
                },
                _,
            ) => Ok(Self {
                channel,
                greeting: Greeting {
                    version,
                    cloud_vm,
                    cloud,
                },
            }),
            (_, line) => Err(HostLinkError::BadAnswer {
                verb: "HELLO",
                line,
            }),
        }
    }

    /// Opens the channel at [`default_path`] with [`DEFAULT_TIMEOUT`].
    pub fn open_default() -> Result<Self, HostLinkError> {
        Self::open(default_path(), DEFAULT_TIMEOUT)
    }

    /// What HELLO told.
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// This cloud VM's id, as the host knows it.
    pub fn cloud_vm(&self) -> &CloudVmId {
        &self.greeting.cloud_vm
    }

    /// This cloud VM's cloud, as the host knows it.
    pub fn cloud(&self) -> &CloudId {
        &self.greeting.cloud
    }

    /// How long a call waits for its answer.
    pub fn timeout(&self) -> Duration {
        self.channel.timeout
    }

    /// Sets how long a call waits for its answer.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.channel.timeout = timeout;
    }

    /// A guest starts here: its memory, a device plugged into this cloud VM.
    pub fn alloc(
        &mut self,
        guest: &DomainUuid,
        ram_bytes: u64,
    ) -> Result<Placement, HostLinkError> {
        self.placed(Op::Alloc {
            guest: guest.clone(),
            ram_bytes,
        })
    }

    /// Whether `peer` is a cloud VM of this cloud VM's cloud on the same host.
    pub fn colocated(&mut self, peer: &CloudVmId) -> Result<Colocation, HostLinkError> {
        match self.op(Op::Colocated { peer: peer.clone() })? {
            (Reply::Colocated(Ok(())), _) => Ok(Colocation::Yes),
            (Reply::Colocated(Err(why)), _) => Ok(Colocation::No(why)),
            (_, line) => Err(HostLinkError::BadAnswer {
                verb: "COLOCATED",
                line,
            }),
        }
    }

    /// The migration's start, asked by the guest's owner: the guest's device plugged into
    /// `peer` too; the answer is where it sits there.
    pub fn share(
        &mut self,
        guest: &DomainUuid,
        peer: &CloudVmId,
    ) -> Result<Placement, HostLinkError> {
        self.placed(Op::Share {
            guest: guest.clone(),
            peer: peer.clone(),
        })
    }

    /// The share's destination, before anything here maps the device (its `migrate begin`):
    /// the share taken; the owner can no longer [`Self::unshare`] it.
    pub fn accept(&mut self, guest: &DomainUuid) -> Result<(), HostLinkError> {
        self.done(Op::Accept {
            guest: guest.clone(),
        })
    }

    /// A failed migration, asked by the owner while the destination has not accepted the
    /// share (refused `accepted` once it has): the device unplugged from the destination;
    /// the owner keeps the guest.
    pub fn unshare(&mut self, guest: &DomainUuid) -> Result<(), HostLinkError> {
        self.done(Op::Unshare {
            guest: guest.clone(),
        })
    }

    /// The migration's end, asked by the owner once its QEMU exited and nothing here maps
    /// the BAR: the device unplugged here; the share's destination owns the guest.
    pub fn release(&mut self, guest: &DomainUuid) -> Result<(), HostLinkError> {
        self.done(Op::Release {
            guest: guest.clone(),
        })
    }

    /// A failed migration, asked by the share's destination once its QEMU exited: the
    /// device unplugged here; the owner keeps the guest.
    pub fn withdraw(&mut self, guest: &DomainUuid) -> Result<(), HostLinkError> {
        self.done(Op::Withdraw {
            guest: guest.clone(),
        })
    }

    /// The guest is destroyed for good, asked by its owner and sole holder: the device
    /// unplugged, the host's file deleted.
    pub fn free(&mut self, guest: &DomainUuid) -> Result<(), HostLinkError> {
        self.done(Op::Free {
            guest: guest.clone(),
        })
    }

    fn placed(&mut self, op: Op) -> Result<Placement, HostLinkError> {
        let verb = op.verb();
        match self.op(op)? {
            (Reply::Placed(p), _) => Ok(p),
            (_, line) => Err(HostLinkError::BadAnswer { verb, line }),
        }
    }

    fn done(&mut self, op: Op) -> Result<(), HostLinkError> {
        let verb = op.verb();
        match self.op(op)? {
            (Reply::Done, _) => Ok(()),
            (_, line) => Err(HostLinkError::BadAnswer { verb, line }),
        }
    }

    fn op(&mut self, op: Op) -> Result<(Reply, String), HostLinkError> {
        let deadline = Instant::now() + self.channel.timeout;
        self.channel.call_until(Request::Op(op), deadline)
    }
}

/// The byte stream under a [`HostLink`]: requests out, answers in, matched by id.
#[derive(Debug)]
struct Channel {
    /// The socket or the port, read and written with plain read(2)/write(2).
    port: File,
    framer: Framer,
    frames: VecDeque<Frame>,
    next_id: u64,
    timeout: Duration,
}

impl Channel {
    fn open(path: &Path, timeout: Duration) -> Result<Self, HostLinkError> {
        let open_error = |source| HostLinkError::Open {
            path: path.to_owned(),
            source,
        };
        let is_socket = std::fs::metadata(path)
            .map_err(open_error)?
            .file_type()
            .is_socket();
        let port = if is_socket {
            File::from(OwnedFd::from(
                UnixStream::connect(path).map_err(open_error)?,
            ))
        } else {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(open_error)?
        };
        // Ids above any an earlier connection on this port used (see the module docs).
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Ok(Self {
            port,
            framer: Framer::default(),
            frames: VecDeque::new(),
            next_id: now.max(1),
            timeout,
        })
    }

    /// Sends `request` and waits until `deadline` for its answer: the reply and its line.
    fn call_until(
        &mut self,
        request: Request,
        deadline: Instant,
    ) -> Result<(Reply, String), HostLinkError> {
        let verb = match &request {
            Request::Hello { .. } => "HELLO",
            Request::Op(op) => op.verb(),
        };
        let id = RequestId(self.next_id);
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let line = format!("{}\n", request.to_line(id));
        self.write_all(verb, line.as_bytes(), deadline)?;
        let want = id.to_string();
        loop {
            let line = match self.next_frame(verb, deadline)? {
                Frame::Line(line) => line,
                Frame::TooLong | Frame::NotUtf8 => {
                    tracing::debug!(verb, "skipped a line from the host that is no answer");
                    continue;
                }
            };
            if line.split(' ').next() != Some(want.as_str()) {
                tracing::debug!(verb, %line, "skipped a line that is not this request's answer");
                continue;
            }
            return match parse_answer(&line) {
                Ok((_, Answer::Ok(reply))) => Ok((reply, line)),
                Ok((_, Answer::Err { code, text })) => {
                    Err(HostLinkError::Refused { verb, code, text })
                }
                Err(_) => Err(HostLinkError::BadAnswer { verb, line }),
            };
        }
    }

    /// Waits until the port is ready for `events`, has hung up or failed, or `deadline`
    /// passes; the events that came.
    fn wait(
        &self,
        verb: &'static str,
        events: PollFlags,
        deadline: Instant,
    ) -> Result<PollFlags, HostLinkError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HostLinkError::Timeout {
                    verb,
                    after: self.timeout,
                });
            }
            // Rounded up, so that a wait never ends before the deadline.
            let millis = left.as_nanos().div_ceil(1_000_000);
            let timeout = PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(self.port.as_fd(), events)];
            match poll(&mut fds, timeout) {
                Ok(0) => continue,
                Ok(_) => return Ok(fds[0].revents().unwrap_or(PollFlags::empty())),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    return Err(HostLinkError::Io {
                        verb,
                        source: e.into(),
                    })
                }
            }
        }
    }

    fn write_all(
        &mut self,
        verb: &'static str,
        mut bytes: &[u8],
        deadline: Instant,
    ) -> Result<(), HostLinkError> {
        while !bytes.is_empty() {
            // A virtio-serial port whose host side is not connected says POLLHUP and would
            // block a writer until it is: that is a closed channel, not a wait.
            if !self
                .wait(verb, PollFlags::POLLOUT, deadline)?
                .contains(PollFlags::POLLOUT)
            {
                return Err(HostLinkError::Closed { verb });
            }
            match self.port.write(bytes) {
                Ok(0) => return Err(HostLinkError::Closed { verb }),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                    return Err(HostLinkError::Closed { verb })
                }
                Err(source) => return Err(HostLinkError::Io { verb, source }),
            }
        }
        Ok(())
    }

    fn next_frame(
        &mut self,
        verb: &'static str,
        deadline: Instant,
    ) -> Result<Frame, HostLinkError> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(frame) = self.frames.pop_front() {
                return Ok(frame);
            }
            // Hung up or failed: the read says which (end of file, or the error).
            self.wait(verb, PollFlags::POLLIN, deadline)?;
            match self.port.read(&mut buf) {
                Ok(0) => return Err(HostLinkError::Closed { verb }),
                Ok(n) => {
                    let mut out = Vec::new();
                    self.framer.push(&buf[..n], &mut out);
                    self.frames.extend(out);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(HostLinkError::Closed { verb })
                }
                Err(source) => return Err(HostLinkError::Io { verb, source }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;

    use vmbeam_core::host_protocol::{parse_request, PciAddress};
    use vmbeam_host::libvirt::fake::FakeHost;
    use vmbeam_host::server::{Config, Host};

    use super::*;

    const A1: &str = "5f0c2b5e-1a2b-4c3d-8e4f-0000000000a1";
    const A2: &str = "5f0c2b5e-1a2b-4c3d-8e4f-0000000000a2";
    const B1: &str = "5f0c2b5e-1a2b-4c3d-8e4f-0000000000b1";
    const G: &str = "6e3b1e9a-1b2c-4d5e-8f90-0123456789ab";
    const MIB: u64 = 1 << 20;

    fn uuid(s: &str) -> DomainUuid {
        DomainUuid::new(s).unwrap()
    }

    fn cvm(s: &str) -> CloudVmId {
        CloudVmId(uuid(s))
    }

    /// The real `vmbeam-host` server over its fake libvirt: cloud VMs a1 and a2 of cloud
    /// `acme`, b1 of cloud `bravo`, each with a 64 GiB window.
    struct RealHost {
        dir: tempfile::TempDir,
        rt: tokio::runtime::Runtime,
        fake: Arc<FakeHost>,
        host: Host,
        links: Mutex<u32>,
    }

    impl RealHost {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let fake = Arc::new(FakeHost::default());
            for (name, uuid, cloud) in [
                ("cvm-a1", A1, "acme"),
                ("cvm-a2", A2, "acme"),
                ("cvm-b1", B1, "bravo"),
            ] {
                let chan = dir.path().join(format!("{name}.chan"));
                fake.add_vm(name, uuid, cloud, 64, &[], chan);
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let config = Config {
                state_dir: dir.path().join("state"),
                rescan: Duration::from_secs(3600),
            };
            let host = Host::open(&config, fake.clone(), fake.clone()).unwrap();
            rt.block_on(host.rescan()).unwrap();
            Self {
                dir,
                rt,
                fake,
                host,
                links: Mutex::new(0),
            }
        }

        /// A socket in the temp dir where the host serves one connection as `cloud_vm`
        /// (what libvirt's channel socket is to the cloud VM's port).
        fn socket(&self, cloud_vm: &str) -> PathBuf {
            let n = {
                let mut links = self.links.lock().unwrap();
                *links += 1;
                *links
            };
            let path = self.dir.path().join(format!("link-{n}.sock"));
            let listener = {
                let _rt = self.rt.enter();
                tokio::net::UnixListener::bind(&path).unwrap()
            };
            let (host, vm) = (self.host.clone(), cvm(cloud_vm));
            self.rt.spawn(async move {
                let (stream, _) = listener.accept().await.unwrap();
                let _ = host.serve(vm, stream).await;
            });
            path
        }

        /// A link of `cloud_vm`, HELLO done.
        fn link(&self, cloud_vm: &str) -> HostLink {
            HostLink::open(self.socket(cloud_vm), Duration::from_secs(10)).unwrap()
        }

        /// The devices attached now: (cloud VM, slot).
        fn attached(&self) -> Vec<(String, u8)> {
            self.fake
                .attached()
                .into_iter()
                .map(|(vm, _, slot)| (vm, slot))
                .collect()
        }
    }

    fn refused(r: Result<impl std::fmt::Debug, HostLinkError>) -> ErrorCode {
        match r {
            Err(HostLinkError::Refused { code, .. }) => code,
            other => panic!("not a refusal: {other:?}"),
        }
    }

    #[test]
    fn hello_then_alloc_places_the_control_page_at_the_end_of_the_bar() {
        let h = RealHost::new();
        let mut a1 = h.link(A1);
        assert_eq!(a1.cloud_vm(), &cvm(A1));
        assert_eq!(a1.cloud().as_str(), "acme");
        assert_eq!(a1.greeting().version, VERSION);

        let p = a1.alloc(&uuid(G), 256 * MIB).unwrap();
        assert_eq!(p.addr, PciAddress::root_slot(0x1f));
        assert_eq!(p.bar_size, 512 * MIB);
        assert_eq!(p.ram_offset, 0);
        assert_eq!(p.control_offset, p.bar_size - 4096);
        assert_eq!(h.attached(), [(A1.to_owned(), 0x1f)]);
        assert_eq!(
            h.fake.files().get(&format!("vmbeam-acme-{G}")),
            Some(&(512 * MIB))
        );
        // The answer lost and ALLOC asked again: the same placement, nothing new.
        assert_eq!(a1.alloc(&uuid(G), 256 * MIB).unwrap(), p);
        assert_eq!(h.attached().len(), 1);
    }

    #[test]
    fn colocated_is_yes_in_the_same_cloud_and_not_colocated_for_another() {
        let h = RealHost::new();
        let mut a1 = h.link(A1);
        assert_eq!(a1.colocated(&cvm(A2)).unwrap(), Colocation::Yes);
        assert!(a1.colocated(&cvm(A2)).unwrap().is_yes());
        assert_eq!(
            a1.colocated(&cvm(B1)).unwrap(),
            Colocation::No(NoReason::NotColocated)
        );
        assert_eq!(
            a1.colocated(&cvm(A1)).unwrap(),
            Colocation::No(NoReason::SelfPeer)
        );
    }

    #[test]
    fn share_then_release_moves_ownership_to_the_destination() {
        let h = RealHost::new();
        let (mut a1, mut a2) = (h.link(A1), h.link(A2));
        let g = uuid(G);
        a1.alloc(&g, 256 * MIB).unwrap();
        let there = a1.share(&g, &cvm(A2)).unwrap();
        assert_eq!(there.bar_size, 512 * MIB);
        assert_eq!(there.control_offset, there.bar_size - 4096);
        assert_eq!(h.attached().len(), 2);
        // Another cloud's cloud VM gets nothing.
        assert_eq!(refused(a1.share(&g, &cvm(B1))), ErrorCode::NotColocated);
        // The destination may not release: it is not the owner.
        assert_eq!(refused(a2.release(&g)), ErrorCode::WrongRole);

        a1.release(&g).unwrap();
        assert_eq!(h.attached(), [(A2.to_owned(), there.addr.slot)]);
        // The old owner holds nothing any more; the new one cannot drop its only copy.
        assert_eq!(refused(a1.release(&g)), ErrorCode::NotHolder);
        assert_eq!(refused(a2.release(&g)), ErrorCode::LastHolder);
    }

    #[test]
    fn withdraw_after_a_failed_migration_leaves_the_owner_holding_the_guest() {
        let h = RealHost::new();
        let (mut a1, mut a2) = (h.link(A1), h.link(A2));
        let g = uuid(G);
        let here = a1.alloc(&g, 64 * MIB).unwrap();
        a1.share(&g, &cvm(A2)).unwrap();
        // Only the share's destination withdraws.
        assert_eq!(refused(a1.withdraw(&g)), ErrorCode::WrongRole);
        a2.withdraw(&g).unwrap();
        assert_eq!(h.attached(), [(A1.to_owned(), here.addr.slot)]);
        assert_eq!(refused(a2.withdraw(&g)), ErrorCode::NotHolder);
        // The owner can share again.
        a1.share(&g, &cvm(A2)).unwrap();
    }

    #[test]
    fn the_owner_unshares_only_until_the_destination_accepts() {
        let h = RealHost::new();
        let (mut a1, mut a2) = (h.link(A1), h.link(A2));
        let g = uuid(G);
        let here = a1.alloc(&g, 64 * MIB).unwrap();
        a1.share(&g, &cvm(A2)).unwrap();
        // Only the owner unshares; the destination withdraws.
        assert_eq!(refused(a2.unshare(&g)), ErrorCode::WrongRole);
        a1.unshare(&g).unwrap();
        assert_eq!(h.attached(), [(A1.to_owned(), here.addr.slot)]);
        // Repeated (its answer lost): nothing to take back.
        a1.unshare(&g).unwrap();
        // The destination that comes late cannot accept what is gone.
        assert_eq!(refused(a2.accept(&g)), ErrorCode::NotHolder);

        // Once accepted, the share is the destination's to take back.
        a1.share(&g, &cvm(A2)).unwrap();
        assert_eq!(refused(a1.accept(&g)), ErrorCode::WrongRole);
        a2.accept(&g).unwrap();
        a2.accept(&g).unwrap();
        assert_eq!(refused(a1.unshare(&g)), ErrorCode::Accepted);
        assert_eq!(h.attached().len(), 2);
        a2.withdraw(&g).unwrap();
        assert_eq!(h.attached(), [(A1.to_owned(), here.addr.slot)]);
    }

    #[test]
    fn free_by_the_sole_holder_leaves_nothing_on_the_host() {
        let h = RealHost::new();
        let (mut a1, mut a2) = (h.link(A1), h.link(A2));
        let g = uuid(G);
        a1.alloc(&g, 64 * MIB).unwrap();
        a1.share(&g, &cvm(A2)).unwrap();
        assert_eq!(refused(a1.free(&g)), ErrorCode::Busy);
        a2.withdraw(&g).unwrap();
        a1.free(&g).unwrap();
        assert!(h.attached().is_empty());
        assert!(h.fake.files().is_empty());
        assert_eq!(refused(a1.free(&g)), ErrorCode::UnknownGuest);
    }

    #[test]
    fn an_error_answer_leaves_the_link_usable() {
        let h = RealHost::new();
        let mut a1 = h.link(A1);
        let g = uuid(G);
        let e = a1.alloc(&g, 1000).unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::BadSize));
        assert!(!e.needs_reconnect());
        assert!(e.to_string().contains("ALLOC"), "{e}");
        assert!(e.to_string().contains("bad-size"), "{e}");
        assert_eq!(refused(a1.release(&g)), ErrorCode::UnknownGuest);
        // Still in step: the next answers are the next requests'.
        a1.alloc(&g, 4096).unwrap();
        assert_eq!(a1.colocated(&cvm(A2)).unwrap(), Colocation::Yes);
        a1.free(&g).unwrap();
    }

    #[test]
    fn a_cloud_vm_unknown_to_the_host_is_refused_at_hello() {
        let h = RealHost::new();
        let stranger = "5f0c2b5e-1a2b-4c3d-8e4f-0000000000ff";
        let e = HostLink::open(h.socket(stranger), Duration::from_secs(10)).unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::NotReady), "{e}");
    }

    /// What a scripted host "sends" to close the connection instead.
    const HANG_UP: &str = "<hang up>";

    /// A scripted host on a socket in a temp dir: `answer` gets each line received (blank
    /// ones too) and returns the lines to send back; `seen` has every line received.
    struct Scripted {
        _dir: tempfile::TempDir,
        path: PathBuf,
        seen: Arc<Mutex<Vec<String>>>,
        thread: JoinHandle<()>,
    }

    fn scripted(mut answer: impl FnMut(&str) -> Vec<String> + Send + 'static) -> Scripted {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let thread = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut wr = stream.try_clone().unwrap();
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { return };
                log.lock().unwrap().push(line.clone());
                for out in answer(&line) {
                    if out == HANG_UP {
                        return;
                    }
                    if wr.write_all(format!("{out}\n").as_bytes()).is_err() {
                        return;
                    }
                }
            }
        });
        Scripted {
            _dir: dir,
            path,
            seen,
            thread,
        }
    }

    /// The id of a request line.
    fn id_of(line: &str) -> u64 {
        parse_request(line).unwrap().0 .0
    }

    fn hello_ok(line: &str) -> String {
        format!("{} OK version=1 cloud-vm={A1} cloud=acme", id_of(line))
    }

    #[test]
    fn a_host_that_never_answers_is_a_timeout() {
        // Nobody answers HELLO.
        let silent = scripted(|_| vec![]);
        let started = Instant::now();
        let e = HostLink::open(&silent.path, Duration::from_millis(300)).unwrap_err();
        assert!(
            matches!(e, HostLinkError::Timeout { verb: "HELLO", .. }),
            "{e:?}"
        );
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(!e.needs_reconnect());

        // HELLO answered, then silence: the call times out, and a late answer to it is
        // skipped by the next call.
        let late = Arc::new(Mutex::new(None::<u64>));
        let pending = late.clone();
        let host = scripted(move |line| match line.split(' ').nth(1) {
            Some("HELLO") => vec![hello_ok(line)],
            Some("FREE") => {
                *pending.lock().unwrap() = Some(id_of(line));
                vec![]
            }
            Some("COLOCATED") => {
                let old = pending.lock().unwrap().take().unwrap();
                vec![
                    format!("{old} OK"),
                    format!("{} OK colocated=yes", id_of(line)),
                ]
            }
            _ => vec![],
        });
        let mut link = HostLink::open(&host.path, Duration::from_millis(300)).unwrap();
        let e = link.free(&uuid(G)).unwrap_err();
        assert!(
            matches!(e, HostLinkError::Timeout { verb: "FREE", .. }),
            "{e:?}"
        );
        link.set_timeout(Duration::from_secs(10));
        assert_eq!(link.colocated(&cvm(A2)).unwrap(), Colocation::Yes);
        assert!(late.lock().unwrap().is_none());
    }

    #[test]
    fn stale_and_unsolicited_lines_are_skipped_and_ids_increase() {
        let mut last = 0;
        let host = scripted(move |line| {
            if line.is_empty() {
                return vec![];
            }
            let id = id_of(line);
            let out = match line.split(' ').nth(1) {
                Some("HELLO") => vec![
                    // Someone else's garbage, and lines that are no answers.
                    "- ERR bad-request 'x' is not a request id".to_owned(),
                    "what is this".to_owned(),
                    format!("{} OK version=1", id + 1),
                    hello_ok(line),
                ],
                // A stale answer with an old id, then the right one.
                Some("ALLOC") => vec![
                    format!("{} ERR busy stale", last),
                    format!(
                        "{id} OK addr=0000:00:1e.0 bar-size=2097152 ram-offset=0 control-offset=2093056"
                    ),
                ],
                _ => vec![format!("{id} OK")],
            };
            last = id;
            out
        });
        let mut link = HostLink::open(&host.path, Duration::from_secs(10)).unwrap();
        let p = link.alloc(&uuid(G), MIB).unwrap();
        assert_eq!(p.addr, PciAddress::root_slot(0x1e));
        assert_eq!(p.control_offset, 2 * MIB - 4096);
        link.release(&uuid(G)).unwrap();
        link.withdraw(&uuid(G)).unwrap();
        drop(link);
        host.thread.join().unwrap();

        let seen = host.seen.lock().unwrap().clone();
        // A blank line first (it ends a half line left on the port), then HELLO.
        assert_eq!(seen[0], "");
        assert!(seen[1].ends_with(" HELLO 1"), "{}", seen[1]);
        let ids: Vec<u64> = seen[1..].iter().map(|l| id_of(l)).collect();
        assert_eq!(ids.len(), 4);
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");
        assert_eq!(seen[2], format!("{} ALLOC {G} {MIB}", ids[1]));
    }

    #[test]
    fn an_answer_of_the_wrong_kind_is_a_bad_answer() {
        let host = scripted(|line| match line.split(' ').nth(1) {
            Some("HELLO") => vec![hello_ok(line)],
            Some("ALLOC") => vec![format!("{} OK colocated=yes", id_of(line))],
            Some(_) => vec![format!("{} OK nonsense", id_of(line))],
            None => vec![],
        });
        let mut link = HostLink::open(&host.path, Duration::from_secs(10)).unwrap();
        let e = link.alloc(&uuid(G), MIB).unwrap_err();
        assert!(
            matches!(e, HostLinkError::BadAnswer { verb: "ALLOC", .. }),
            "{e:?}"
        );
        let e = link.free(&uuid(G)).unwrap_err();
        assert!(
            matches!(e, HostLinkError::BadAnswer { verb: "FREE", .. }),
            "{e:?}"
        );
    }

    #[test]
    fn a_closed_channel_needs_a_new_link() {
        let host = scripted(|line| match line.split(' ').nth(1) {
            Some("HELLO") => vec![hello_ok(line)],
            // The host goes away instead of answering.
            Some(_) => vec![HANG_UP.to_owned()],
            None => vec![],
        });
        let mut link = HostLink::open(&host.path, Duration::from_secs(10)).unwrap();
        let e = link.free(&uuid(G)).unwrap_err();
        assert!(matches!(e, HostLinkError::Closed { verb: "FREE" }), "{e:?}");
        assert!(e.needs_reconnect());
        host.thread.join().unwrap();
    }

    #[test]
    fn a_character_device_is_opened_read_write_and_a_half_line_left_on_it_is_ended() {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        // A pseudo-terminal in raw mode stands in for the virtio-serial port: the slave is
        // the cloud VM's character device, the master the host's end.
        let pty = nix::pty::openpty(None, None).unwrap();
        let mut raw = tcgetattr(&pty.slave).unwrap();
        cfmakeraw(&mut raw);
        tcsetattr(&pty.slave, SetArg::TCSANOW, &raw).unwrap();
        let path = nix::unistd::ttyname(&pty.slave).unwrap();
        // An earlier writer (a vmbeamd that died mid-line) left half a line on the port.
        let mut earlier = File::from(pty.slave);
        earlier.write_all(b"7 ALL").unwrap();

        let master = File::from(pty.master);
        let mut wr = master.try_clone().unwrap();
        // The host's thread gives its end back when done: closing a pty's master hangs up
        // the slave and drops what it has not read yet.
        let host = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut lines = BufReader::new(master).lines();
            for line in lines.by_ref() {
                let line = line.unwrap();
                seen.push(line.clone());
                let answer = match line.split(' ').nth(1) {
                    Some("HELLO") => hello_ok(&line),
                    Some("RELEASE") => format!("{} OK", id_of(&line)),
                    _ => continue,
                };
                wr.write_all(format!("{answer}\n").as_bytes()).unwrap();
                if answer.ends_with(" OK") {
                    break;
                }
            }
            (seen, lines, wr)
        });
        let mut link = HostLink::open(&path, Duration::from_secs(10)).unwrap();
        assert_eq!(link.cloud_vm(), &cvm(A1));
        link.release(&uuid(G)).unwrap();
        let (seen, _master, _wr) = host.join().unwrap();
        // The half line ended by the blank line, not glued to HELLO.
        assert_eq!(seen[0], "7 ALL");
        assert!(seen[1].ends_with(" HELLO 1"), "{seen:?}");
        assert!(seen[2].ends_with(&format!(" RELEASE {G}")), "{seen:?}");
        drop(earlier);
    }

    #[test]
    fn a_missing_channel_cannot_be_opened() {
        let dir = tempfile::tempdir().unwrap();
        let e = HostLink::open(dir.path().join("nope"), Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, HostLinkError::Open { .. }), "{e:?}");
        assert!(e.needs_reconnect());
        assert_eq!(
            default_path(),
            Path::new("/dev/virtio-ports/org.vmbeam.host.0")
        );
    }
}
