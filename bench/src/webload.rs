//! The web load of experiment g (the paper's Fig. 7): clients in the lab's load-generator
//! network namespace fetching a page from the guest's web server over and over, one new TCP
//! connection per request (as httperf does by default), counting completed requests.
//!
//! Each client is a thread that enters the namespace (`setns` moves only the calling thread),
//! so no helper program is needed and the counts are exact.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{io_err, Error, Result};

/// A running load: `clients` threads until [`WebLoad::stop`].
pub struct WebLoad {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    started: Instant,
    threads: Vec<JoinHandle<()>>,
}

/// What a load phase measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WebResult {
    /// Completed requests (full response with status 200).
    pub requests: u64,
    /// Failed requests (connect, read or status errors, timeouts).
    pub failures: u64,
    /// Length of the phase, s.
    pub seconds: f64,
}

impl WebResult {
    /// Completed requests per second.
    pub fn rps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.requests as f64 / self.seconds
        } else {
            0.0
        }
    }
}

fn one_request(addr: &SocketAddr, path: &str) -> std::io::Result<bool> {
    let timeout = Duration::from_secs(5);
    let mut s = TcpStream::connect_timeout(addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n")?;
    let mut buf = Vec::with_capacity(4096);
    s.read_to_end(&mut buf)?;
    Ok(buf.starts_with(b"HTTP/1.1 200") || buf.starts_with(b"HTTP/1.0 200"))
}

impl WebLoad {
    /// Starts `clients` clients in the network namespace at `netns_path` (e.g.
    /// `/run/netns/vmbeam-load`) requesting `http://addr{path}`.
    pub fn start(netns_path: &Path, addr: SocketAddr, path: &str, clients: u32) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for _ in 0..clients.max(1) {
            let ns = std::fs::File::open(netns_path).map_err(io_err(netns_path))?;
            let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
            let path = path.to_string();
            let (tx, rx) = std::sync::mpsc::channel();
            threads.push(std::thread::spawn(move || {
                let entered = nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET);
                let ok = entered.is_ok();
                let _ = tx.send(entered.map_err(|e| e.to_string()));
                if !ok {
                    return;
                }
                while !stop.load(Ordering::Acquire) {
                    match one_request(&addr, &path) {
                        Ok(true) => done.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }));
            rx.recv()
                .map_err(|_| Error::Data("load client thread died".into()))?
                .map_err(|e| Error::Data(format!("enter {}: {e}", netns_path.display())))?;
        }
        Ok(WebLoad {
            stop,
            done,
            failed,
            started: Instant::now(),
            threads,
        })
    }

    /// Stops the clients (each finishes its request) and returns the counts.
    pub fn stop(self) -> WebResult {
        let seconds = self.started.elapsed().as_secs_f64();
        let requests = self.done.load(Ordering::Relaxed);
        let failures = self.failed.load(Ordering::Relaxed);
        self.stop.store(true, Ordering::Release);
        for t in self.threads {
            let _ = t.join();
        }
        WebResult {
            requests,
            failures,
            seconds,
        }
    }

    /// Runs the load for `d` and returns the counts.
    pub fn run_for(
        netns_path: &Path,
        addr: SocketAddr,
        path: &str,
        clients: u32,
        d: Duration,
    ) -> Result<WebResult> {
        let l = WebLoad::start(netns_path, addr, path, clients)?;
        std::thread::sleep(d);
        Ok(l.stop())
    }
}

/// The clients enter a network namespace (`setns`, even into their own: CAP_SYS_ADMIN), so
/// this needs root: only with the `root-tests` feature (scripts/test.sh's root-units tier).
#[cfg(all(test, feature = "root-tests"))]
mod tests {
    use super::*;

    #[test]
    fn counts_requests_against_a_local_server() {
        // A tiny HTTP server on loopback; the "namespace" is our own.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { continue };
                // Read the whole request before answering: closing a socket with unread
                // data resets the connection instead of ending it.
                let mut req = Vec::new();
                let mut buf = [0u8; 512];
                while !req.ends_with(b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok");
            }
        });
        let own = Path::new("/proc/self/ns/net");
        let r = WebLoad::run_for(own, addr, "/", 2, Duration::from_millis(300)).unwrap();
        assert!(r.requests > 0, "{r:?}");
        assert_eq!(r.failures, 0, "{r:?}");
        assert!(r.rps() > 0.0);
        // Nothing listening: every request fails, none counted.
        let dead: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let r = WebLoad::run_for(own, dead, "/", 1, Duration::from_millis(100)).unwrap();
        assert_eq!(r.requests, 0);
        assert!(r.failures > 0);
    }
}
