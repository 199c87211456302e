//! The command channel's transport: a tty (put in raw mode), a pty, a unix socket, or
//! stdin/stdout. One thread reads lines and hands them to a handler; one thread writes
//! answer lines from a bounded queue. Nobody else ever blocks on the channel: lines that
//! cannot be queued, or that arrive while no channel is open, are dropped (as a serial
//! port with no host connected drops them).

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::ChanSpec;

/// Longest line accepted; longer ones are cut.
const MAX_LINE: usize = 4096;
/// Lines waiting to be written at most; more are dropped.
const QUEUE: usize = 512;
/// Pause between attempts to (re)open the channel.
const RETRY: Duration = Duration::from_millis(200);

/// Rewrites a line before it is queued.
type LineMap = Arc<dyn Fn(String) -> String + Send + Sync>;

/// Sends lines to the channel without ever blocking.
#[derive(Clone)]
pub struct Outbox {
    tx: SyncSender<String>,
    map: Option<LineMap>,
}

impl Outbox {
    /// A new outbox and the receiving end for [`start`].
    pub fn new() -> (Self, Receiver<String>) {
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        (Self { tx, map: None }, rx)
    }

    /// The same outbox, each line rewritten by `map` first (a reply in another framing).
    pub fn mapped(&self, map: impl Fn(String) -> String + Send + Sync + 'static) -> Self {
        Self {
            tx: self.tx.clone(),
            map: Some(Arc::new(map)),
        }
    }

    /// Queues one line (without its newline); dropped if the queue is full.
    pub fn send(&self, line: String) {
        let line = match &self.map {
            Some(m) => m(line),
            None => line,
        };
        let _ = self.tx.try_send(line);
    }
}

/// The handler for each received line.
pub type LineHandler = Arc<dyn Fn(&str) + Send + Sync>;

type Writer = Box<dyn Write + Send>;

/// The reading half of a channel: something to read that can also be polled.
pub trait ChanRead: Read + AsRawFd + Send {}
impl<T: Read + AsRawFd + Send> ChanRead for T {}

/// A partial line older than this is dropped: clients send whole lines in one write, so a
/// fragment left by a client that disconnected mid-line (QEMU's socket chardev keeps the
/// guest's serial port open across host connections) must not prefix the next client's
/// first command.
const STALE_PARTIAL_LINE: Duration = Duration::from_secs(1);

/// Waits up to `timeout` for `fd` to become readable; false on timeout.
fn wait_readable(fd: RawFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: p is one valid pollfd and the count passed is 1.
    let r = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as libc::c_int) };
    // Errors (EINTR...) count as readable: the read that follows reports real problems.
    r != 0
}

/// Puts a tty in raw mode: no echo, no line editing, no output processing, 8 bits,
/// ignore modem lines, reads return as soon as one byte is there.
pub fn make_raw(fd: RawFd) -> io::Result<()> {
    // SAFETY: termios is a plain C struct; all-zero is a valid value to be overwritten.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is an open descriptor and t a valid, writable termios.
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: t is a valid termios obtained above.
    unsafe { libc::cfmakeraw(&mut t) };
    t.c_cflag |= libc::CLOCAL | libc::CREAD;
    t.c_cflag &= !libc::CRTSCTS;
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
    // 115200 baud, set in the flags directly (cfsetspeed's versioned glibc symbol does not
    // link statically). QEMU's UART does not throttle output by baud rate, but it derives
    // its receive-timeout interrupt delay from it: a higher rate answers short commands
    // sooner. A pty ignores the speed.
    t.c_cflag = (t.c_cflag & !libc::CBAUD) | libc::B115200;
    t.c_ispeed = libc::B115200;
    t.c_ospeed = libc::B115200;
    // SAFETY: fd is an open descriptor and t a valid termios.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_blocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL on an open descriptor has no memory effects.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if fl < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL with flags derived from F_GETFL on an open descriptor.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens a channel path: connects if it is a unix socket, else opens it read-write (raw
/// mode if a tty). Returns reader and writer halves.
pub fn open_path(path: &Path) -> io::Result<(Box<dyn ChanRead>, Writer)> {
    let meta = std::fs::metadata(path)?;
    if meta.file_type().is_socket() {
        let s = UnixStream::connect(path)?;
        return Ok((Box::new(s.try_clone()?), Box::new(s)));
    }
    // O_NONBLOCK for the open itself: a serial port without CLOCAL would otherwise wait
    // for carrier detect.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(path)?;
    let fd = f.as_raw_fd();
    // SAFETY: isatty on an open descriptor has no memory effects.
    if unsafe { libc::isatty(fd) } == 1 {
        make_raw(fd)?;
    }
    set_blocking(fd)?;
    Ok((Box::new(f.try_clone()?), Box::new(f)))
}

/// Where the kernel lists virtio-serial ports (one directory per port, its `name` file
/// holding the name the host gave it).
const SYS_VIRTIO_PORTS: &str = "/sys/class/virtio-ports";

/// The device node of the virtio-serial port named `name` (`/dev/vportNpM`; the guest
/// runs no udev, so there are no `/dev/virtio-ports/NAME` links).
pub fn virtio_port(sys: &Path, name: &str) -> io::Result<std::path::PathBuf> {
    for entry in std::fs::read_dir(sys)? {
        let entry = entry?;
        let Ok(n) = std::fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if n.trim_end() == name {
            return Ok(Path::new("/dev").join(entry.file_name()));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no virtio-serial port named {name} in {}", sys.display()),
    ))
}

/// Calls `handler` for every line read from `r` until EOF or an error. A partial line
/// followed by [`STALE_PARTIAL_LINE`] of silence is dropped.
fn read_lines(r: &mut dyn ChanRead, handler: &LineHandler) -> io::Result<()> {
    let mut buf = [0u8; 1024];
    let mut line: Vec<u8> = Vec::with_capacity(256);
    loop {
        if !line.is_empty() && !wait_readable(r.as_raw_fd(), STALE_PARTIAL_LINE) {
            line.clear();
            continue;
        }
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for &b in &buf[..n] {
            if b == b'\n' || b == b'\r' {
                if !line.is_empty() {
                    handler(&String::from_utf8_lossy(&line));
                    line.clear();
                }
            } else if line.len() < MAX_LINE {
                line.push(b);
            }
        }
    }
}

/// Starts the reader and writer threads for `spec`. Lines queued in `outbox_rx` are
/// written to whichever channel is open.
pub fn start(spec: ChanSpec, outbox_rx: Receiver<String>, handler: LineHandler) {
    if spec == ChanSpec::Off {
        return;
    }
    let current: Arc<Mutex<Option<Writer>>> = Arc::new(Mutex::new(None));
    let cur_w = Arc::clone(&current);
    // libvirt, the client of a QGA channel, takes anything unsolicited for a broken agent.
    let quiet = matches!(spec, ChanSpec::Qga(_));
    std::thread::Builder::new()
        .name("chan-writer".into())
        .spawn(move || {
            for mut line in outbox_rx {
                if quiet && line.starts_with("* ") {
                    continue;
                }
                line.push('\n');
                let mut g = cur_w.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(w) = g.as_mut() {
                    if w.write_all(line.as_bytes())
                        .and_then(|()| w.flush())
                        .is_err()
                    {
                        *g = None;
                    }
                }
            }
        })
        .expect("spawn the channel writer");
    let open = |spec: &ChanSpec| -> io::Result<(Box<dyn ChanRead>, Writer)> {
        match spec {
            ChanSpec::Stdio => Ok((Box::new(io::stdin()), Box::new(io::stdout()))),
            ChanSpec::Path(p) => open_path(p),
            ChanSpec::VirtioPort(name) | ChanSpec::Qga(name) => {
                open_path(&virtio_port(Path::new(SYS_VIRTIO_PORTS), name)?)
            }
            ChanSpec::Off => Err(io::Error::other("no channel")),
        }
    };
    let install = move |w: Option<Writer>| *current.lock().unwrap_or_else(|p| p.into_inner()) = w;
    // The first open happens before returning, so lines queued right after start() (the
    // READY line) reach the channel if it can be opened at all.
    let mut last_err = String::new();
    let mut first: Option<Box<dyn ChanRead>> = match open(&spec) {
        Ok((r, w)) => {
            install(Some(w));
            Some(r)
        }
        Err(e) => {
            report(&mut last_err, &spec, &e);
            None
        }
    };
    std::thread::Builder::new()
        .name("chan-reader".into())
        .spawn(move || loop {
            let reader = match first.take() {
                Some(r) => Some(r),
                None => match open(&spec) {
                    Ok((r, w)) => {
                        install(Some(w));
                        Some(r)
                    }
                    Err(e) => {
                        report(&mut last_err, &spec, &e);
                        None
                    }
                },
            };
            if let Some(r) = reader {
                let mut r = r;
                let res = read_lines(&mut *r, &handler);
                install(None);
                if spec == ChanSpec::Stdio {
                    // The host test closed our stdin: it is done with us.
                    std::process::exit(0);
                }
                if let Err(e) = res {
                    report(&mut last_err, &spec, &e);
                }
            }
            std::thread::sleep(RETRY);
        })
        .expect("spawn the channel reader");
}

/// Prints a channel error once (not again while it repeats).
fn report(last: &mut String, spec: &ChanSpec, e: &io::Error) {
    let msg = format!("VMBEAM-AGENT channel {spec:?}: {e} (retrying)");
    if *last != msg {
        eprintln!("{msg}");
        *last = msg;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect() -> (LineHandler, Arc<Mutex<Vec<String>>>) {
        let got = Arc::new(Mutex::new(Vec::<String>::new()));
        let g = Arc::clone(&got);
        (
            Arc::new(move |l| g.lock().unwrap().push(l.to_string())),
            got,
        )
    }

    #[test]
    fn splits_lines_on_newline_and_carriage_return() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"1 PING\n2 CHECK\r\n\n3 STATS\r4 RATE 5")
            .unwrap();
        drop(b);
        let (h, got) = collect();
        read_lines(&mut a, &h).unwrap();
        assert_eq!(*got.lock().unwrap(), ["1 PING", "2 CHECK", "3 STATS"]);
    }

    #[test]
    fn a_stale_partial_line_is_dropped() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let (h, got) = collect();
        let t = std::thread::spawn(move || read_lines(&mut a, &h));
        b.write_all(b"left-over-from-a-dead-cli").unwrap();
        std::thread::sleep(STALE_PARTIAL_LINE + Duration::from_millis(300));
        b.write_all(b"7 PING\n8 STA").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        b.write_all(b"TS\n").unwrap();
        drop(b);
        t.join().unwrap().unwrap();
        assert_eq!(*got.lock().unwrap(), ["7 PING", "8 STATS"]);
    }

    #[test]
    fn virtio_ports_are_found_by_name() {
        let sys = std::env::temp_dir().join(format!("vmbeam-agent-vports-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&sys);
        for (port, name) in [
            ("vport0p1", "org.qemu.guest_agent.0"),
            ("vport0p2", "other"),
        ] {
            std::fs::create_dir_all(sys.join(port)).unwrap();
            std::fs::write(sys.join(port).join("name"), format!("{name}\n")).unwrap();
        }
        // A port the host gave no name has an empty name file; one may lack it.
        std::fs::create_dir_all(sys.join("vport0p3")).unwrap();
        assert_eq!(
            virtio_port(&sys, "org.qemu.guest_agent.0").unwrap(),
            Path::new("/dev/vport0p1")
        );
        assert_eq!(
            virtio_port(&sys, "other").unwrap(),
            Path::new("/dev/vport0p2")
        );
        let e = virtio_port(&sys, "org.vmbeam.agent").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("org.vmbeam.agent"), "{e}");
        let _ = std::fs::remove_dir_all(&sys);
    }

    #[test]
    fn unix_socket_channel_round_trip() {
        let dir = std::env::temp_dir().join(format!("vmbeam-agent-chan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("chan.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let (outbox, rx) = Outbox::new();
        let ob = outbox.clone();
        start(
            ChanSpec::Path(path.clone()),
            rx,
            Arc::new(move |l| ob.send(format!("echo {l}"))),
        );
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"1 PING\n").unwrap();
        let mut buf = [0u8; 64];
        let mut got = Vec::new();
        while !got.ends_with(b"\n") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"echo 1 PING\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
