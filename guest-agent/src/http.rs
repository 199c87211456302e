//! A small HTTP server: `/` (a tiny page, for web-throughput experiments), `/stats`,
//! `/check` (JSON, the same facts as the channel) and `/bytes/<n>` (n bytes).

use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::Duration;

use tiny_http::{Header, Method, Response, Server, StatusCode};

use crate::stats::Stats;
use crate::worker::Request;

/// Threads serving requests.
const THREADS: usize = 4;
/// Largest `/bytes/<n>`.
pub const MAX_BYTES: u64 = 1 << 34;
/// How long `/check` waits for the worker.
const CHECK_TIMEOUT: Duration = Duration::from_secs(300);

/// An endless reader of a fixed printable pattern, cut to a length.
struct Filler {
    left: u64,
    pos: usize,
}

const FILL: &[u8; 64] = b"VMBeam lab guest filler bytes 0123456789abcdefghijklmnopqrstuvw\n";

impl Read for Filler {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize;
        for b in &mut buf[..n] {
            *b = FILL[self.pos];
            self.pos = (self.pos + 1) % FILL.len();
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("valid static header")
}

fn text(status: u16, content_type: &str, body: String) -> Response<io::Cursor<Vec<u8>>> {
    Response::from_data(body.into_bytes())
        .with_status_code(StatusCode(status))
        .with_header(header("Content-Type", content_type))
}

fn serve(server: &Server, stats: &Stats, worker: &Sender<Request>) {
    loop {
        let req = match server.recv() {
            Ok(r) => r,
            Err(_) => continue,
        };
        let path = req.url().split('?').next().unwrap_or("").to_string();
        let get = matches!(req.method(), Method::Get | Method::Head);
        let result = if !get {
            req.respond(text(405, "text/plain", "only GET\n".into()))
        } else if path == "/" || path == "/index.html" {
            let s = stats.snapshot();
            let body = format!(
                "<!doctype html><html><head><title>VMBeam lab guest</title></head><body>\
                 <h1>VMBeam lab guest</h1><p>boot_id {} up {} ms, {} pages, dirty rate {} pages/s</p>\
                 </body></html>\n",
                s.boot_id, s.uptime_ms, s.pages, s.achieved_rate_1s
            );
            req.respond(text(200, "text/html; charset=utf-8", body))
        } else if path == "/stats" {
            req.respond(text(
                200,
                "application/json",
                stats.snapshot().to_json() + "\n",
            ))
        } else if path == "/check" {
            let (tx, rx) = mpsc::channel();
            let sent = worker.send(Request::Check(Box::new(move |r| {
                let _ = tx.send(r);
            })));
            match sent.ok().and_then(|()| rx.recv_timeout(CHECK_TIMEOUT).ok()) {
                Some(r) => req.respond(text(200, "application/json", r.to_json() + "\n")),
                None => req.respond(text(
                    503,
                    "text/plain",
                    "the memory worker did not answer\n".into(),
                )),
            }
        } else if let Some(n) = path.strip_prefix("/bytes/") {
            match n.parse::<u64>() {
                Ok(n) if n <= MAX_BYTES => {
                    let r = Response::new(
                        StatusCode(200),
                        vec![header("Content-Type", "application/octet-stream")],
                        Filler { left: n, pos: 0 },
                        Some(n as usize),
                        None,
                    );
                    req.respond(r)
                }
                _ => req.respond(text(
                    400,
                    "text/plain",
                    format!("bad length (0..={MAX_BYTES})\n"),
                )),
            }
        } else {
            req.respond(text(404, "text/plain", "not found\n".into()))
        };
        // A client that went away is not our problem.
        let _ = result;
    }
}

/// Binds `addr:port` and serves on a few threads; returns the bound port.
pub fn start(
    addr: IpAddr,
    port: u16,
    stats: Arc<Stats>,
    worker: Sender<Request>,
) -> io::Result<u16> {
    let server =
        Server::http(SocketAddr::new(addr, port)).map_err(|e| io::Error::other(e.to_string()))?;
    let bound = server
        .server_addr()
        .to_ip()
        .map(|a| a.port())
        .unwrap_or(port);
    let server = Arc::new(server);
    for i in 0..THREADS {
        let (server, stats, worker) = (Arc::clone(&server), Arc::clone(&stats), worker.clone());
        std::thread::Builder::new()
            .name(format!("http-{i}"))
            .spawn(move || serve(&server, &stats, &worker))?;
    }
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filler_gives_exactly_n_bytes() {
        let mut v = Vec::new();
        Filler { left: 1000, pos: 0 }.read_to_end(&mut v).unwrap();
        assert_eq!(v.len(), 1000);
        assert_eq!(&v[..64], FILL);
    }
}
