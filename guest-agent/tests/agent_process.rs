//! Runs the real agent binary on the host with a small memory size and talks to it over
//! stdin/stdout, a pty (raw mode: no echo) and HTTP on loopback.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

const AGENT: &str = env!("CARGO_BIN_EXE_vmbeam-guest-agent");
const TIMEOUT: Duration = Duration::from_secs(20);

/// The agent with its channel on stdin/stdout.
struct Agent {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Lines read but not yet asked for.
    backlog: Vec<String>,
}

impl Agent {
    fn start(extra: &[&str]) -> Self {
        let mut child = Command::new(AGENT)
            .args([
                "--cmdline",
                "/dev/null",
                "--mem-mib",
                "4",
                "--chan-stdio",
                "--console",
                "-",
            ])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the agent");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Self {
            child,
            stdin,
            lines: rx,
            backlog: Vec::new(),
        }
    }

    /// The first line starting with `prefix`, from the backlog or read now; other lines
    /// read meanwhile go to the backlog.
    fn expect(&mut self, prefix: &str) -> String {
        if let Some(i) = self.backlog.iter().position(|l| l.starts_with(prefix)) {
            return self.backlog.remove(i);
        }
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let l = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no line starting with {prefix:?} within {TIMEOUT:?}"));
            if l.starts_with(prefix) {
                return l;
            }
            self.backlog.push(l);
        }
    }

    fn ask(&mut self, id: u32, cmd: &str) -> String {
        let s = self.stdin.as_mut().unwrap();
        writeln!(s, "{id} {cmd}").unwrap();
        s.flush().unwrap();
        self.expect(&format!("{id} "))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn http_get(port: u16, path: &str) -> (String, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header");
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    (head, buf[split + 4..].to_vec())
}

#[test]
fn stdio_ping_check_corrupt_check_fail() {
    let mut a = Agent::start(&["--dirty-rate", "500", "--http-port", "off"]);
    let ready = a.expect("* READY ");
    let boot_id = field(&ready, "boot_id").unwrap().to_string();
    assert_eq!(boot_id.len(), 32);
    assert_eq!(field(&ready, "pages"), Some("1024"));

    let pong = a.ask(1, "PING");
    assert!(pong.starts_with("1 PONG boot_id="), "{pong}");
    assert_eq!(field(&pong, "boot_id"), Some(boot_id.as_str()));

    let check = a.ask(2, "CHECK");
    assert!(check.starts_with("2 CHECK PASS pages=1024 "), "{check}");
    assert_eq!(field(&check, "boot_id"), Some(boot_id.as_str()));

    assert_eq!(a.ask(3, "CORRUPT 5"), "3 OK corrupted=5 offset=2048");
    // Even while dirtying (which may rewrite page 5 before the pass reaches it: it is
    // verified before it is rewritten) the corruption must be reported.
    let fail = a.ask(4, "CHECK");
    assert!(fail.starts_with("4 CHECK FAIL bad="), "{fail}");
    assert_eq!(field(&fail, "first_bad"), Some("5"), "{fail}");
    assert_eq!(field(&fail, "ever_bad"), Some("1"), "{fail}");
    let bad = a.expect("* BAD page=5 ");
    assert!(bad.contains("offset=2048"), "{bad}");

    let stats = a.ask(5, "STATS");
    assert!(stats.starts_with("5 STATS boot_id="), "{stats}");
    for k in [
        "uptime_ms",
        "pages",
        "target_rate",
        "achieved_rate",
        "achieved_rate_1s",
        "dirtied",
        "passes",
        "bad",
    ] {
        assert!(field(&stats, k).is_some(), "{k} missing in {stats}");
    }
    assert_eq!(field(&stats, "bad"), Some("1"));
    assert_eq!(field(&stats, "target_rate"), Some("500"));
    // The dirtier paces itself in ticks; on a loaded machine the first pages may take a
    // moment: wait (bounded) until it has dirtied some.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut id = 50;
    let mut stats = stats;
    while field(&stats, "dirtied").unwrap().parse::<u64>().unwrap() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing dirtied in 10 s: {stats}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
        stats = a.ask(id, "STATS");
        id += 1;
    }

    assert_eq!(a.ask(6, "RATE 0"), "6 OK rate=0");
    assert_eq!(a.ask(7, "FROB 1"), "7 ERR unknown command FROB 1");
    assert!(a
        .ask(8, "CORRUPT 1024")
        .starts_with("8 ERR page 1024 out of range"));
    let phys = a.ask(9, "PHYS 3");
    assert!(
        phys.starts_with("9 PHYS page=3 addr=0x") || phys.starts_with("9 ERR "),
        "{phys}"
    );

    // Closing stdin ends the agent.
    drop(a.stdin.take());
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(st) = a.child.try_wait().unwrap() {
            assert!(st.success(), "{st}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not exit after stdin closed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn http_endpoints() {
    let mut a = Agent::start(&["--http-port", "0", "--http-addr", "127.0.0.1"]);
    let ready = a.expect("* READY ");
    let port: u16 = field(&ready, "http_port").unwrap().parse().unwrap();
    assert_ne!(port, 0);
    let boot_id = field(&ready, "boot_id").unwrap().to_string();

    let (head, body) = http_get(port, "/");
    assert!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "{head}"
    );
    assert!(String::from_utf8_lossy(&body).contains(&boot_id));

    let (_, body) = http_get(port, "/stats");
    let s = String::from_utf8(body).unwrap();
    assert!(
        s.starts_with('{') && s.contains(&format!("\"boot_id\":\"{boot_id}\"")),
        "{s}"
    );
    assert!(s.contains("\"bad\":0"), "{s}");

    let (_, body) = http_get(port, "/check");
    let s = String::from_utf8(body).unwrap();
    assert!(
        s.contains("\"result\":\"PASS\"") && s.contains("\"pages\":1024"),
        "{s}"
    );

    let (_, body) = http_get(port, "/bytes/100000");
    assert_eq!(body.len(), 100000);

    let (head, _) = http_get(port, "/nope");
    assert!(head.contains(" 404"), "{head}");

    assert_eq!(a.ask(1, "CORRUPT 0"), "1 OK corrupted=0 offset=2048");
    let (_, body) = http_get(port, "/check");
    let s = String::from_utf8(body).unwrap();
    assert!(
        s.contains("\"result\":\"FAIL\"") && s.contains("\"first_bad\":0"),
        "{s}"
    );
}

#[test]
fn pty_channel_is_raw_and_answers() {
    use std::os::fd::FromRawFd;
    // SAFETY: posix_openpt returns a new descriptor or -1 (checked).
    let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) };
    assert!(master >= 0, "posix_openpt");
    // SAFETY: master is the pty master just opened.
    assert_eq!(unsafe { libc::grantpt(master) }, 0);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::unlockpt(master) }, 0);
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: name is a writable buffer of the given length.
    let r = unsafe { libc::ptsname_r(master, name.as_mut_ptr(), name.len()) };
    assert_eq!(r, 0);
    // SAFETY: ptsname_r wrote a NUL-terminated string into name.
    let slave = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .to_string();
    // SAFETY: master is an open descriptor that nothing else owns.
    let mut m = unsafe { std::fs::File::from_raw_fd(master) };

    let mut child = Command::new(AGENT)
        .args([
            "--cmdline",
            "/dev/null",
            "--mem-mib",
            "2",
            "--console",
            "-",
            "--http-port",
            "off",
        ])
        .args(["--chan", &slave])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let mut reader = m.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        let mut acc = Vec::new();
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            acc.extend_from_slice(&buf[..n]);
            while let Some(p) = acc.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = acc.drain(..=p).collect();
                let _ = tx.send(String::from_utf8_lossy(&line).to_string());
            }
        }
    });
    let next = || rx.recv_timeout(TIMEOUT).expect("a line from the pty");
    let ready = next();
    assert!(ready.starts_with("* READY "), "{ready:?}");
    // Raw mode: no ONLCR, so lines end in a bare \n.
    assert!(
        ready.ends_with("=0\n") && !ready.ends_with("\r\n"),
        "{ready:?}"
    );
    m.write_all(b"1 PING\n").unwrap();
    // Raw mode: no echo of "1 PING", the first line back is the answer.
    let pong = next();
    assert!(pong.starts_with("1 PONG boot_id="), "{pong:?}");
    let _ = child.kill();
    let _ = child.wait();
}
