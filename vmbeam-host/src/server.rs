//! The daemon: rescans the host's libvirt every few seconds (discovers cloud VMs, reconciles
//! the ledger with their live XML, saves it and the status snapshot), keeps one connection
//! to each cloud VM's host channel (libvirt binds the socket, the host connects; a restarted
//! cloud VM, with a new libvirt domain id, gets a new connection), and answers the lines
//! that come in on it.
//!
//! Requests on one channel are answered one at a time, in order; different cloud VMs are
//! served concurrently. An operation is decided under the state lock (pure, in the ledger),
//! its libvirt and file steps run on a blocking thread without the lock, and the outcome is
//! committed (or rolled back), saved and answered. Each operation runs in its own `tracing`
//! span (`guest_op`: request id, verb, cloud VM, guest, peer), so one grep tells its story.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::task::JoinHandle;
use tracing::{info_span, Instrument as _};

use crate::cloudvm::{discover, CloudVmId, Topology};
use crate::device::largest_fitting_bar;
use crate::error_chain;
use crate::ledger::{Decision, Ledger, OpKind, Outcome, StepError};
use crate::libvirt::{run, BackingFiles, FileError, HostLibvirt, LibvirtError};
use crate::protocol::{
    parse_request, Answer, ErrorCode, Frame, Framer, Op, Reply, Request, RequestId, VERSION,
};
use crate::state::{StateDir, StateError};
use crate::status::StatusSnapshot;

/// How long an answer may take to write before the connection is dropped (a cloud VM that
/// stops reading its port).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// The daemon's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The state directory.
    pub state_dir: PathBuf,
    /// The time between two rescans.
    pub rescan: Duration,
}

/// Why the daemon cannot start or rescan.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The state directory.
    #[error("state directory")]
    State(#[from] StateError),
    /// libvirt.
    #[error("libvirt")]
    Libvirt(#[from] LibvirtError),
    /// The backing files' directory.
    #[error("backing files")]
    Files(#[from] FileError),
    /// A blocking worker died.
    #[error("a worker thread died")]
    Worker,
}

/// A cloud VM's channel task.
struct Channel {
    domain_id: Option<u32>,
    path: PathBuf,
    connected: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct State {
    ledger: Ledger,
    topology: Topology,
    problems: Vec<String>,
    channels: BTreeMap<CloudVmId, Channel>,
}

struct Inner {
    libvirt: Arc<dyn HostLibvirt>,
    files: Arc<dyn BackingFiles>,
    store: StateDir,
    rescan: Duration,
    state: Mutex<State>,
}

/// The daemon (cheap to clone: one shared state).
#[derive(Clone)]
pub struct Host {
    inner: Arc<Inner>,
}

/// One connection's state.
#[derive(Debug, Default)]
pub struct Session {
    version: Option<u32>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Host {
    /// Opens the state directory and loads the ledger.
    pub fn open(
        config: &Config,
        libvirt: Arc<dyn HostLibvirt>,
        files: Arc<dyn BackingFiles>,
    ) -> Result<Self, HostError> {
        let store = StateDir::open(&config.state_dir)?;
        let ledger = store.load_ledger()?;
        Ok(Self {
            inner: Arc::new(Inner {
                libvirt,
                files,
                store,
                rescan: config.rescan,
                state: Mutex::new(State {
                    ledger,
                    ..State::default()
                }),
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; go on with it.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the ledger and the status snapshot (failures are logged: the daemon goes on,
    /// and the next change tries again).
    fn persist(&self, st: &State, ledger_changed: bool) {
        if ledger_changed {
            if let Err(e) = self.inner.store.save_ledger(&st.ledger) {
                tracing::error!(error = %error_chain(&e), "cannot save the ledger");
            }
        }
        let connected: BTreeSet<CloudVmId> = st
            .channels
            .iter()
            .filter(|(_, c)| c.connected.load(Ordering::Relaxed))
            .map(|(id, _)| id.clone())
            .collect();
        let snapshot = StatusSnapshot::new(
            &st.ledger,
            &st.topology,
            &connected,
            &st.problems,
            now_unix(),
        );
        if let Err(e) = self.inner.store.save_status(&snapshot) {
            tracing::warn!(error = %error_chain(&e), "cannot save the status");
        }
    }

    /// Lists the running domains and the backing files, and brings the ledger in line.
    pub async fn rescan(&self) -> Result<(), HostError> {
        let since = self.state().ledger.clock();
        let (libvirt, files) = (self.inner.libvirt.clone(), self.inner.files.clone());
        let (domains, file_keys) = tokio::task::spawn_blocking(move || -> Result<_, HostError> {
            Ok((libvirt.running_domains()?, files.list()?))
        })
        .await
        .map_err(|_| HostError::Worker)??;
        let discovery = discover(&domains);
        let mut st = self.state();
        let st = &mut *st;
        let findings = st.ledger.reconcile(&discovery.topology, &file_keys, since);
        let ledger_changed = findings.iter().any(|f| f.changes_ledger());
        for f in findings.iter().filter(|f| f.changes_ledger()) {
            tracing::warn!(finding = %f, "reconciled with libvirt");
        }
        let mut problems: Vec<String> = discovery.errors.iter().map(|e| error_chain(e)).collect();
        for vm in discovery
            .topology
            .cloud_vms
            .values()
            .filter(|vm| !vm.window_declared)
        {
            let largest = largest_fitting_bar(&[], vm.window).map_or(0, |b| b >> 20);
            problems.push(format!(
                "cloud VM {} declares no <pcihole64>: QEMU's default window takes one guest of less than {largest} MiB",
                vm.name
            ));
        }
        problems.extend(
            findings
                .iter()
                .filter(|f| !f.changes_ledger())
                .map(|f| f.to_string()),
        );
        problems.extend(st.ledger.violations(&discovery.topology));
        let old: BTreeSet<&String> = st.problems.iter().collect();
        for p in problems.iter().filter(|p| !old.contains(p)) {
            tracing::warn!(problem = %p, "found");
        }
        st.problems = problems;
        st.topology = discovery.topology;
        self.persist(st, ledger_changed);
        Ok(())
    }

    /// Starts a connection to every cloud VM's channel that has none (or has one to an
    /// earlier run of the cloud VM), and stops those of cloud VMs that are gone.
    fn connect_channels(&self) {
        let mut st = self.state();
        let st = &mut *st;
        st.channels.retain(|id, c| {
            let keep = st.topology.cloud_vms.contains_key(id);
            if !keep {
                c.task.abort();
            }
            keep
        });
        for vm in st.topology.cloud_vms.values() {
            let current = st.channels.get(&vm.id).is_some_and(|c| {
                c.domain_id == vm.domain_id && c.path == vm.channel && !c.task.is_finished()
            });
            if current {
                continue;
            }
            if let Some(old) = st.channels.remove(&vm.id) {
                old.task.abort();
            }
            let connected = Arc::new(AtomicBool::new(false));
            let (host, id, path, flag) = (
                self.clone(),
                vm.id.clone(),
                vm.channel.clone(),
                connected.clone(),
            );
            let span = info_span!("channel", cloud_vm = %vm.name);
            let task = tokio::spawn(
                async move {
                    match UnixStream::connect(&path).await {
                        Ok(stream) => {
                            flag.store(true, Ordering::Relaxed);
                            tracing::info!(path = %path.display(), "connected");
                            let result = host.serve(id, stream).await;
                            flag.store(false, Ordering::Relaxed);
                            match result {
                                Ok(()) => tracing::info!("channel closed"),
                                Err(e) => tracing::info!(error = %e, "channel lost"),
                            }
                        }
                        Err(e) => tracing::debug!(error = %e, path = %path.display(), "cannot connect yet"),
                    }
                }
                .instrument(span),
            );
            st.channels.insert(
                vm.id.clone(),
                Channel {
                    domain_id: vm.domain_id,
                    path: vm.channel.clone(),
                    connected,
                    task,
                },
            );
        }
    }

    /// Runs the daemon: rescans and (re)connects channels every rescan interval, forever.
    /// A failed rescan is logged and retried.
    pub async fn run(&self) {
        loop {
            if let Err(e) = self.rescan().await {
                tracing::warn!(error = %error_chain(&e), "rescan failed");
            }
            self.connect_channels();
            tokio::time::sleep(self.inner.rescan).await;
        }
    }

    /// Serves one connection to `cloud_vm`'s channel until it closes.
    pub async fn serve<S>(&self, cloud_vm: CloudVmId, stream: S) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let mut framer = Framer::default();
        let mut session = Session::default();
        let mut buf = vec![0u8; 4096];
        let mut frames = Vec::new();
        loop {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            framer.push(&buf[..n], &mut frames);
            for frame in frames.drain(..) {
                let Some(line) = self.answer(&cloud_vm, &mut session, frame).await else {
                    continue;
                };
                let bytes = format!("{line}\n");
                tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(bytes.as_bytes()))
                    .await
                    .map_err(|_| {
                        io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the cloud VM does not read its answers",
                        )
                    })??;
            }
        }
    }

    /// The answer line to one frame from `cloud_vm` (`None` for a blank line, which a cloud
    /// VM may send to end a half line an earlier writer left on the port).
    pub async fn answer(
        &self,
        cloud_vm: &CloudVmId,
        session: &mut Session,
        frame: Frame,
    ) -> Option<String> {
        let line = match frame {
            Frame::TooLong => {
                let text = format!("lines are at most {} bytes", crate::protocol::MAX_LINE);
                return Some(Answer::err(ErrorCode::LineTooLong, text).to_line(None));
            }
            Frame::NotUtf8 => {
                return Some(Answer::err(ErrorCode::BadRequest, "not UTF-8").to_line(None))
            }
            Frame::Line(line) if line.trim().is_empty() => return None,
            Frame::Line(line) => line,
        };
        let answer = match parse_request(&line) {
            Err(bad) => {
                return Some(Answer::err(ErrorCode::BadRequest, &bad.reason).to_line(bad.id))
            }
            Ok((id, Request::Hello { versions })) => (id, self.hello(cloud_vm, session, &versions)),
            Ok((id, Request::Op(_))) if session.version.is_none() => (
                id,
                Answer::err(ErrorCode::HelloFirst, format!("send HELLO {VERSION} first")),
            ),
            Ok((id, Request::Op(op))) => (id, self.execute(cloud_vm, id, op).await),
        };
        Some(answer.1.to_line(Some(answer.0)))
    }

    fn hello(&self, cloud_vm: &CloudVmId, session: &mut Session, versions: &[u32]) -> Answer {
        if !versions.contains(&VERSION) {
            return Answer::err(
                ErrorCode::UnsupportedVersion,
                format!("this host speaks version {VERSION}"),
            );
        }
        let st = self.state();
        match st.topology.cloud_vms.get(cloud_vm) {
            Some(vm) => {
                session.version = Some(VERSION);
                tracing::info!(cloud_vm = %cloud_vm, name = %vm.name, cloud = %vm.cloud, "HELLO answered");
                Answer::Ok(Reply::Hello {
                    version: VERSION,
                    cloud_vm: cloud_vm.clone(),
                    cloud: vm.cloud.clone(),
                })
            }
            None => {
                tracing::info!(cloud_vm = %cloud_vm, "HELLO refused: not a usable cloud VM now");
                Answer::err(
                    ErrorCode::NotReady,
                    "this cloud VM is not a usable VMBeam cloud VM of this host right now",
                )
            }
        }
    }

    /// Decides, runs and commits one operation from `asker`.
    async fn execute(&self, asker: &CloudVmId, id: RequestId, op: Op) -> Answer {
        let name = self
            .state()
            .topology
            .cloud_vms
            .get(asker)
            .map_or_else(|| asker.to_string(), |vm| vm.name.clone());
        let span = info_span!(
            "guest_op",
            req = %id,
            op = op.verb(),
            cloud_vm = %name,
            guest = tracing::field::Empty,
            peer = tracing::field::Empty,
        );
        if let Some(g) = op.guest() {
            span.record("guest", tracing::field::display(g));
        }
        if let Some(p) = op.peer() {
            span.record("peer", tracing::field::display(p));
        }
        async move {
            let decision = {
                let mut st = self.state();
                let st = &mut *st;
                let d = st.ledger.decide(&st.topology, asker, &op);
                if matches!(d, Ok(Decision::Recorded(_))) {
                    // Saved before the answer: an ACCEPT the asker relies on survives a restart.
                    self.persist(st, true);
                }
                d
            };
            let t = match decision {
                Err(refusal) => {
                    tracing::info!(refusal = %refusal, "refused");
                    return match op {
                        Op::Colocated { .. } => Answer::Ok(Reply::Colocated(Err(refusal.no_reason()))),
                        _ => Answer::err(refusal.code(), refusal.wire_text()),
                    };
                }
                Ok(Decision::Answer(reply) | Decision::Recorded(reply)) => {
                    tracing::info!(?reply, "answered");
                    return Answer::Ok(reply);
                }
                Ok(Decision::Run(t)) => t,
            };
            tracing::info!(target = %t.target, addr = %t.device.addr, bar_size = t.device.bar_size, "running");
            let (libvirt, files, steps) = (self.inner.libvirt.clone(), self.inner.files.clone(), t.clone());
            let outcome = tokio::task::spawn_blocking(move || run(&steps, &*libvirt, &*files))
                .await
                .unwrap_or_else(|e| Outcome::Failed {
                    done: 0,
                    error: StepError::Failed(format!("the worker died ({e}); the next rescan settles it with libvirt")),
                });
            {
                let mut st = self.state();
                st.ledger.finish(&t, &outcome);
                self.persist(&st, true);
            }
            match outcome {
                Outcome::Done => {
                    tracing::info!("done");
                    Answer::Ok(t.reply())
                }
                Outcome::Failed { done, error } => {
                    tracing::warn!(%error, done, "failed");
                    match (&error, t.kind, done) {
                        (StepError::FileExists(path), _, _) => Answer::err(
                            ErrorCode::Exists,
                            format!("the backing file {path} exists already (left by an earlier guest?); nothing changed"),
                        ),
                        (StepError::Unsettled(_), _, _) => Answer::err(
                            ErrorCode::Failed,
                            format!("{} not confirmed: {error}; the unplug may still complete, the host's next rescan takes libvirt's word for it", t.kind),
                        ),
                        (_, OpKind::Free, 1) => Answer::err(
                            ErrorCode::Failed,
                            format!("the device is gone from this cloud VM but its file could not be deleted: {error}"),
                        ),
                        _ => Answer::err(ErrorCode::Failed, format!("{} failed, nothing changed: {error}", t.kind)),
                    }
                }
            }
        }
        .instrument(span)
        .await
    }
}

/// The unit tests of the daemon end to end: requests as bytes over a socket pair (or over a
/// unix socket the test binds, as libvirt does), answered by a [`Host`] over the fake
/// libvirt and backing files of [`crate::libvirt::fake`]. The real libvirt and real cloud VMs
/// are exercised by the nested lab's end-to-end tests; nothing here needs root, libvirtd or
/// QEMU.
#[cfg(test)]
mod tests {
    use std::path::Path;

    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::UnixListener;

    use super::*;
    use crate::libvirt::fake::{FailOn, FakeHost};
    use crate::protocol::{parse_answer, Placement};

    const A1: &str = "5f0c2b5e-1a2b-4c3d-8e4f-0000000000a1";
    const A2: &str = "5f0c2b5e-1a2b-4c3d-8e4f-0000000000a2";
    const B1: &str = "5f0c2b5e-1a2b-4c3d-8e4f-0000000000b1";
    const G: &str = "6e3b1e9a-1b2c-4d5e-8f90-0123456789ab";
    const GIB: u64 = 1 << 30;

    struct Rig {
        _dir: tempfile::TempDir,
        state_dir: PathBuf,
        fake: Arc<FakeHost>,
        host: Host,
    }

    fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(FakeHost::default());
        fake.add_vm("cvm-a1", A1, "acme", 64, &[], dir.path().join("a1.sock"));
        fake.add_vm("cvm-a2", A2, "acme", 2, &[], dir.path().join("a2.sock"));
        fake.add_vm("cvm-b1", B1, "bravo", 64, &[], dir.path().join("b1.sock"));
        let state_dir = dir.path().join("state");
        let host = open(&state_dir, &fake);
        Rig {
            _dir: dir,
            state_dir,
            fake,
            host,
        }
    }

    fn open(state_dir: &Path, fake: &Arc<FakeHost>) -> Host {
        let config = Config {
            state_dir: state_dir.to_path_buf(),
            rescan: Duration::from_millis(20),
        };
        Host::open(&config, fake.clone(), fake.clone()).unwrap()
    }

    fn id(s: &str) -> CloudVmId {
        CloudVmId(vmbeam_core::DomainUuid::new(s).unwrap())
    }

    /// A cloud VM's end of a channel.
    struct Client {
        rd: BufReader<tokio::io::ReadHalf<UnixStream>>,
        wr: tokio::io::WriteHalf<UnixStream>,
    }

    impl Client {
        async fn send(&mut self, bytes: &[u8]) {
            self.wr.write_all(bytes).await.unwrap();
        }

        async fn line(&mut self) -> String {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(10), self.rd.read_line(&mut line))
                .await
                .expect("an answer in time")
                .unwrap();
            assert!(n > 0, "the host closed the channel");
            line.trim_end_matches('\n').to_owned()
        }

        async fn ask(&mut self, request: &str) -> String {
            self.send(format!("{request}\n").as_bytes()).await;
            self.line().await
        }
    }

    fn client(stream: UnixStream) -> Client {
        let (rd, wr) = tokio::io::split(stream);
        Client {
            rd: BufReader::new(rd),
            wr,
        }
    }

    /// A channel to `cloud_vm` over a socket pair, HELLO done.
    async fn channel(host: &Host, cloud_vm: &str) -> Client {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (host, vm) = (host.clone(), id(cloud_vm));
        tokio::spawn(async move { host.serve(vm, theirs).await });
        let mut c = client(ours);
        let hello = c.ask("1 HELLO 1").await;
        assert!(hello.starts_with("1 OK version=1 cloud-vm="), "{hello}");
        c
    }

    fn placed(line: &str) -> Placement {
        match parse_answer(line).unwrap().1 {
            Answer::Ok(Reply::Placed(p)) => p,
            other => panic!("{line}: {other:?}"),
        }
    }

    fn code(line: &str) -> ErrorCode {
        match parse_answer(line).unwrap().1 {
            Answer::Err { code, .. } => code,
            other => panic!("{line}: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_guest_starts_moves_with_its_memory_and_is_freed() {
        let r = rig();
        r.host.rescan().await.unwrap();
        let mut a1 = channel(&r.host, A1).await;
        let mut a2 = channel(&r.host, A2).await;
        let name = format!("vmbeam-acme-{G}");

        // Start: a 256 MiB guest gets a 512 MiB BAR at the top slot.
        let p = placed(&a1.ask(&format!("2 ALLOC {G} 268435456")).await);
        assert_eq!(
            p,
            Placement::new(crate::device::PciAddress::root_slot(0x1f), 512 << 20)
        );
        assert_eq!(r.fake.files().get(&name), Some(&(512 << 20)));
        // The answer was lost and ALLOC repeated: the same answer, nothing new.
        assert_eq!(placed(&a1.ask(&format!("3 ALLOC {G} 268435456")).await), p);
        assert_eq!(r.fake.attached().len(), 1);

        // Co-location: yes for a cloud VM of the same cloud; another cloud's looks absent.
        assert_eq!(
            a1.ask(&format!("4 COLOCATED {A2}")).await,
            "4 OK colocated=yes"
        );
        assert_eq!(
            a1.ask(&format!("5 COLOCATED {B1}")).await,
            "5 OK colocated=no reason=not-colocated"
        );
        let absent = "5f0c2b5e-1a2b-4c3d-8e4f-0000000000ff";
        assert_eq!(
            a1.ask(&format!("6 COLOCATED {absent}")).await,
            "6 OK colocated=no reason=not-colocated"
        );
        assert_eq!(
            a1.ask(&format!("7 COLOCATED {A1}")).await,
            "7 OK colocated=no reason=self"
        );

        // Migration: share with a2, then the source releases.
        let there = placed(&a1.ask(&format!("8 SHARE {G} {A2}")).await);
        assert_eq!(there.bar_size, 512 << 20);
        assert_eq!(r.fake.attached().len(), 2);
        // The destination may not release, the source may not share again or free.
        assert_eq!(
            code(&a2.ask(&format!("9 RELEASE {G}")).await),
            ErrorCode::WrongRole
        );
        assert_eq!(
            code(&a1.ask(&format!("10 SHARE {G} {B1}")).await),
            ErrorCode::NotColocated
        );
        assert_eq!(
            code(&a1.ask(&format!("11 FREE {G}")).await),
            ErrorCode::Busy
        );
        assert_eq!(a1.ask(&format!("12 RELEASE {G}")).await, "12 OK");
        assert_eq!(
            r.fake.attached(),
            [(A2.to_owned(), name.clone(), there.addr.slot)].into()
        );
        // a2 owns it now: a1 is no holder any more, a2 cannot release its only copy.
        assert_eq!(
            code(&a1.ask(&format!("13 RELEASE {G}")).await),
            ErrorCode::NotHolder
        );
        assert_eq!(
            code(&a2.ask(&format!("14 RELEASE {G}")).await),
            ErrorCode::LastHolder
        );

        // And back, with a failed migration on the way: the destination withdraws.
        placed(&a2.ask(&format!("15 SHARE {G} {A1}")).await);
        assert_eq!(a1.ask(&format!("16 WITHDRAW {G}")).await, "16 OK");
        assert_eq!(r.fake.attached().len(), 1);

        // Destroyed for good.
        assert_eq!(a2.ask(&format!("17 FREE {G}")).await, "17 OK");
        assert!(r.fake.attached().is_empty());
        assert!(r.fake.files().is_empty());
        assert_eq!(
            code(&a2.ask(&format!("18 FREE {G}")).await),
            ErrorCode::UnknownGuest
        );

        // Every step was saved: the status shows no guest, three cloud VMs.
        let status = StateDir::open(&r.state_dir)
            .unwrap()
            .load_status()
            .unwrap()
            .unwrap();
        assert!(status.guests.is_empty());
        assert_eq!(status.cloud_vms.len(), 3);
    }

    #[tokio::test]
    async fn refusals_are_typed_and_change_nothing() {
        let r = rig();
        r.host.rescan().await.unwrap();
        let mut a1 = channel(&r.host, A1).await;
        let mut a2 = channel(&r.host, A2).await;
        let mut b1 = channel(&r.host, B1).await;
        let before = r.fake.calls();
        // a2's 2 GiB default-sized window: a 2 GiB guest needs a 4 GiB BAR.
        assert_eq!(
            code(&a2.ask(&format!("2 ALLOC {G} {}", 2 * GIB)).await),
            ErrorCode::WindowFull
        );
        assert_eq!(
            code(&a1.ask(&format!("3 ALLOC {G} 1000")).await),
            ErrorCode::BadSize
        );
        assert_eq!(
            code(&a1.ask(&format!("4 RELEASE {G}")).await),
            ErrorCode::UnknownGuest
        );
        assert_eq!(
            r.fake.calls(),
            before,
            "no libvirt or file call for a refusal"
        );

        placed(&a1.ask(&format!("5 ALLOC {G} {}", GIB)).await);
        // The same UUID in another cloud is another guest.
        placed(&b1.ask(&format!("6 ALLOC {G} {}", GIB)).await);
        assert_eq!(r.fake.files().len(), 2);
        // a2 cannot take a 2 GiB BAR, whoever asks.
        assert_eq!(
            code(&a1.ask(&format!("7 SHARE {G} {A2}")).await),
            ErrorCode::WindowFull
        );
        assert_eq!(
            code(&a2.ask(&format!("8 SHARE {G} {A1}")).await),
            ErrorCode::NotHolder
        );
        assert_eq!(
            code(&a2.ask(&format!("9 FREE {G}")).await),
            ErrorCode::NotHolder
        );
        assert_eq!(
            code(&a1.ask(&format!("10 ALLOC {G} 4096")).await),
            ErrorCode::Exists
        );
        assert_eq!(
            code(&a1.ask(&format!("11 WITHDRAW {G}")).await),
            ErrorCode::WrongRole
        );
        assert_eq!(r.fake.attached().len(), 2);
    }

    #[tokio::test]
    async fn failures_roll_back_to_what_libvirt_has() {
        let r = rig();
        r.host.rescan().await.unwrap();
        let mut a1 = channel(&r.host, A1).await;
        r.fake.fail_next(FailOn::Attach);
        let failed = a1.ask(&format!("2 ALLOC {G} 4096")).await;
        assert_eq!(code(&failed), ErrorCode::Failed);
        assert!(failed.contains("nothing changed"), "{failed}");
        assert!(r.fake.files().is_empty(), "the file was removed again");
        placed(&a1.ask(&format!("3 ALLOC {G} 4096")).await);

        r.fake.fail_next(FailOn::Remove);
        let half = a1.ask(&format!("4 FREE {G}")).await;
        assert_eq!(code(&half), ErrorCode::Failed);
        assert!(half.contains("could not be deleted"), "{half}");
        assert!(r.fake.attached().is_empty());
        // The guest is gone; its file is an orphan the next rescan reports, not deletes.
        assert_eq!(
            code(&a1.ask(&format!("5 FREE {G}")).await),
            ErrorCode::UnknownGuest
        );
        r.host.rescan().await.unwrap();
        r.host.rescan().await.unwrap();
        assert_eq!(r.fake.files().len(), 1);
        let status = StateDir::open(&r.state_dir)
            .unwrap()
            .load_status()
            .unwrap()
            .unwrap();
        assert!(
            status.problems.iter().any(|p| p.contains("has no holder")),
            "{:?}",
            status.problems
        );
        // A new ALLOC of that guest meets the file and says so.
        assert_eq!(
            code(&a1.ask(&format!("6 ALLOC {G} 4096")).await),
            ErrorCode::Exists
        );
    }

    #[tokio::test]
    async fn an_unconfirmed_unplug_is_settled_by_the_next_rescan() {
        let r = rig();
        r.host.rescan().await.unwrap();
        let mut a1 = channel(&r.host, A1).await;
        let mut a2 = channel(&r.host, A2).await;
        placed(&a1.ask(&format!("2 ALLOC {G} 4096")).await);
        placed(&a1.ask(&format!("3 SHARE {G} {A2}")).await);
        // libvirt does not confirm the unplug in time (it completes later).
        r.fake.fail_next(FailOn::DetachTimeout);
        let late = a1.ask(&format!("4 RELEASE {G}")).await;
        assert_eq!(code(&late), ErrorCode::Failed);
        assert!(late.contains("not confirmed"), "{late}");
        assert_eq!(
            code(&a2.ask(&format!("5 RELEASE {G}")).await),
            ErrorCode::WrongRole
        );
        // The rescan takes libvirt's word: a1's device is gone, a2 owns the guest.
        r.host.rescan().await.unwrap();
        assert_eq!(
            code(&a2.ask(&format!("6 RELEASE {G}")).await),
            ErrorCode::LastHolder
        );
        assert_eq!(a2.ask(&format!("7 FREE {G}")).await, "7 OK");
        assert!(r.fake.files().is_empty());
    }

    #[tokio::test]
    async fn bad_lines_are_answered_and_the_channel_lives_on() {
        let r = rig();
        r.host.rescan().await.unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        let host = r.host.clone();
        tokio::spawn(async move { host.serve(id(A1), theirs).await });
        let mut c = client(ours);
        assert_eq!(
            code(&c.ask(&format!("1 ALLOC {G} 4096")).await),
            ErrorCode::HelloFirst
        );
        assert_eq!(
            code(&c.ask("2 HELLO 7 8").await),
            ErrorCode::UnsupportedVersion
        );
        assert!(c.ask("garbage").await.starts_with("- ERR bad-request"));
        assert!(c
            .ask("3 DANCE")
            .await
            .starts_with("3 ERR bad-request unknown request"));
        c.send(&[b'x'; 3000]).await;
        assert!(c.line().await.starts_with("- ERR line-too-long"));
        // The rest of the long line is skipped; a blank line gets no answer.
        c.send(b"xxxx\n\n\xff\n").await;
        assert!(c.line().await.starts_with("- ERR bad-request not UTF-8"));
        assert!(c.ask("4 HELLO 2 1").await.starts_with("4 OK version=1"));
        placed(&c.ask(&format!("5 ALLOC {G} 4096")).await);
    }

    #[tokio::test]
    async fn unusable_cloud_vms_are_reported_by_name_and_other_domains_ignored() {
        let r = rig();
        r.fake.add_other("web", "<domain type='kvm' id='9'><name>web</name><uuid>11111111-2222-3333-4444-555555555555</uuid></domain>");
        r.fake.add_other(
            "cvm-q35",
            "<domain type='kvm' id='8'><name>cvm-q35</name><uuid>11111111-2222-3333-4444-666666666666</uuid>\
             <metadata><v:cloud-vm xmlns:v='https://vmbeam.dev/xmlns/vmbeam/1'><v:cloud>acme</v:cloud></v:cloud-vm></metadata>\
             <os><type machine='pc-q35-10.0'>hvm</type></os></domain>",
        );
        r.host.rescan().await.unwrap();
        let status = StateDir::open(&r.state_dir)
            .unwrap()
            .load_status()
            .unwrap()
            .unwrap();
        assert_eq!(status.cloud_vms.len(), 3);
        assert_eq!(
            status.problems,
            vec!["cloud VM 'cvm-q35' cannot be used by VMBeam: its machine type 'pc-q35-10.0' is not an i440FX ('pc') machine".to_owned()]
        );
        // A listing that fails is an error of the rescan, and the state stays as it was.
        r.fake.fail_next(FailOn::List);
        assert!(matches!(r.host.rescan().await, Err(HostError::Libvirt(_))));
        assert_eq!(r.host.state().topology.cloud_vms.len(), 3);
    }

    #[tokio::test]
    async fn a_cloud_vm_unknown_to_the_host_is_not_ready() {
        let r = rig();
        // No rescan yet: the host knows no cloud VM.
        let (ours, theirs) = UnixStream::pair().unwrap();
        let host = r.host.clone();
        tokio::spawn(async move { host.serve(id(A1), theirs).await });
        let mut c = client(ours);
        assert_eq!(code(&c.ask("1 HELLO 1").await), ErrorCode::NotReady);
    }

    #[tokio::test]
    async fn a_restarted_daemon_reloads_and_reconciles_with_libvirt() {
        let r = rig();
        r.host.rescan().await.unwrap();
        let mut a1 = channel(&r.host, A1).await;
        placed(&a1.ask(&format!("2 ALLOC {G} 4096")).await);
        placed(&a1.ask(&format!("3 SHARE {G} {A2}")).await);

        // A new daemon on the same state: the share is still in place, roles included.
        let again = open(&r.state_dir, &r.fake);
        again.rescan().await.unwrap();
        let mut a2 = channel(&again, A2).await;
        assert_eq!(
            code(&a2.ask(&format!("2 RELEASE {G}")).await),
            ErrorCode::WrongRole
        );

        // The source cloud VM restarts (its devices are gone): the destination owns it.
        r.fake.restart_vm(A1);
        again.rescan().await.unwrap();
        assert_eq!(
            code(&a2.ask(&format!("3 RELEASE {G}")).await),
            ErrorCode::LastHolder
        );
        assert_eq!(a2.ask(&format!("4 FREE {G}")).await, "4 OK");

        // A device attached behind VMBeam's back is adopted; one of another cloud's guest
        // in this cloud VM is reported, never taken.
        let key = |cloud: &str| crate::device::GuestKey {
            cloud: vmbeam_core::CloudId::new(cloud).unwrap(),
            uuid: vmbeam_core::DomainUuid::new(G).unwrap(),
        };
        let dev = |cloud: &str, slot| crate::device::ShmemDevice {
            guest: key(cloud),
            bar_size: 1 << 20,
            addr: crate::device::PciAddress::root_slot(slot),
        };
        r.fake.plant_file(&key("acme").shmem_name(), 1 << 20);
        r.fake.plant_device(A2, dev("acme", 0x10));
        r.fake.plant_device(A2, dev("bravo", 0x11));
        again.rescan().await.unwrap();
        assert_eq!(a2.ask(&format!("5 FREE {G}")).await, "5 OK");
        let status = StateDir::open(&r.state_dir)
            .unwrap()
            .load_status()
            .unwrap()
            .unwrap();
        assert!(
            status
                .problems
                .iter()
                .any(|p| p.contains("does not manage")),
            "{:?}",
            status.problems
        );
        let text = status.render(status.written_unix, true);
        assert!(text.contains("cvm-a2"), "{text}");
        assert!(text.contains("problems"), "{text}");
    }

    #[tokio::test]
    async fn the_daemon_finds_channels_and_reconnects_to_restarted_cloud_vms() {
        let r = rig();
        // a1's channel socket, bound as libvirt binds it.
        let sock = r._dir.path().join("a1.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let host = r.host.clone();
        let daemon = tokio::spawn(async move { host.run().await });

        let (stream, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .unwrap()
            .unwrap();
        let mut c = client(stream);
        assert!(c.ask("1 HELLO 1").await.starts_with("1 OK"));
        placed(&c.ask(&format!("2 ALLOC {G} 4096")).await);

        // The cloud VM restarts: a new domain id; the host drops the old connection and
        // comes back, and the guest's memory is gone from the ledger with the device.
        r.fake.restart_vm(A1);
        let (stream, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .unwrap()
            .unwrap();
        let mut c = client(stream);
        assert!(c.ask("1 HELLO 1").await.starts_with("1 OK"));
        assert_eq!(
            code(&c.ask(&format!("2 RELEASE {G}")).await),
            ErrorCode::UnknownGuest
        );
        // The status shows the channel connected (it is written at every rescan).
        let connected = || {
            let status = StateDir::open(&r.state_dir)
                .unwrap()
                .load_status()
                .unwrap()
                .unwrap();
            status
                .cloud_vms
                .iter()
                .any(|v| v.name == "cvm-a1" && v.connected)
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !connected() {
            assert!(
                std::time::Instant::now() < deadline,
                "never shown connected"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        daemon.abort();
    }
}
