//! The host side of the guest agent's command channel: a line protocol over the guest's
//! second serial port, which QEMU exposes as a unix socket in the cloud VM's private /run.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Talking to a guest agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot connect to the agent channel {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("agent channel I/O")]
    Io(#[from] std::io::Error),
    #[error("no answer from the guest agent within {0:?}")]
    Timeout(Duration),
    #[error("unexpected answer from the guest agent: {0}")]
    Protocol(String),
}

/// A connection to one guest agent.
pub struct AgentClient {
    transport: Transport,
    next_id: u64,
}

enum Transport {
    /// The agent's own line protocol on a unix socket (the lab's guests: their second
    /// serial port).
    Socket {
        reader: BufReader<UnixStream>,
        writer: UnixStream,
    },
    /// Through libvirt's guest-agent API (`virDomainQemuAgentCommand`): for a guest whose
    /// agent speaks QGA on Nova's `org.qemu.guest_agent.0` channel, which libvirt holds.
    Qga { uri: String, domain: String },
}

/// The agent's verdict on the guest's memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    pub pass: bool,
    /// The whole answer line (after the request id).
    pub line: String,
    pub boot_id: Option<String>,
    pub pages: Option<u64>,
}

impl AgentClient {
    /// Connects to the agent channel socket.
    pub fn connect(path: &Path) -> Result<Self, AgentError> {
        let s = UnixStream::connect(path).map_err(|source| AgentError::Connect {
            path: path.into(),
            source,
        })?;
        let mut writer = s.try_clone()?;
        // A partial line left by an earlier client would prefix our first command.
        writer.write_all(b"\n")?;
        Ok(Self {
            transport: Transport::Socket {
                reader: BufReader::new(s),
                writer,
            },
            next_id: 1,
        })
    }

    /// An agent reached through the libvirt at `uri` (domain `domain`'s guest-agent
    /// channel, the agent booted with `vmbeam.chan=qga:org.qemu.guest_agent.0`).
    pub fn via_libvirt(uri: &str, domain: &str) -> Self {
        Self {
            transport: Transport::Qga {
                uri: uri.into(),
                domain: domain.into(),
            },
            next_id: 1,
        }
    }

    /// One command through libvirt's guest-agent API; the answer line.
    fn qga_request(
        uri: &str,
        domain: &str,
        cmd: &str,
        timeout: Duration,
    ) -> Result<String, AgentError> {
        let failed = |what: &str, e: virt::error::Error| {
            AgentError::Protocol(format!("{what} ({domain} at {uri}): {e}"))
        };
        let mut conn =
            virt::connect::Connect::open(Some(uri)).map_err(|e| failed("connect to libvirt", e))?;
        let result = (|| {
            let dom = virt::domain::Domain::lookup_by_name(&conn, domain)
                .map_err(|e| failed("look up the domain", e))?;
            let request = serde_json::json!({
                "execute": "vmbeam-command",
                "arguments": {"line": cmd},
            })
            .to_string();
            let secs = i32::try_from(timeout.as_secs().max(1)).unwrap_or(i32::MAX);
            let reply = dom.qemu_agent_command(&request, secs, 0).map_err(|e| {
                if e.code() == virt::error::ErrorNumber::AgentUnresponsive {
                    AgentError::Timeout(timeout)
                } else {
                    failed("qemu-agent-command", e)
                }
            })?;
            let v: serde_json::Value = serde_json::from_str(&reply)
                .map_err(|e| AgentError::Protocol(format!("not JSON: {reply}: {e}")))?;
            v["return"]["line"]
                .as_str()
                .map(str::to_string)
                .ok_or(AgentError::Protocol(reply))
        })();
        let _ = conn.close();
        result
    }
    /// Sends one command and returns the answer line (without the id), skipping
    /// unsolicited lines and stale answers.
    pub fn request(&mut self, cmd: &str, timeout: Duration) -> Result<String, AgentError> {
        let id = self.next_id;
        self.next_id += 1;
        let (reader, writer) = match &mut self.transport {
            Transport::Socket { reader, writer } => (reader, writer),
            Transport::Qga { uri, domain } => return Self::qga_request(uri, domain, cmd, timeout),
        };
        let deadline = Instant::now() + timeout;
        writer.write_all(format!("{id} {cmd}\n").as_bytes())?;
        let prefix = format!("{id} ");
        let mut line = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(AgentError::Timeout(timeout));
            }
            reader.get_ref().set_read_timeout(Some(left))?;
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) => return Err(AgentError::Protocol("channel closed".into())),
                Ok(_) => {
                    let l = line.trim_end_matches(['\r', '\n']);
                    if let Some(rest) = l.strip_prefix(&prefix) {
                        return Ok(rest.to_string());
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(AgentError::Timeout(timeout));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// `PING`: the agent's boot id.
    pub fn ping(&mut self, timeout: Duration) -> Result<String, AgentError> {
        let a = self.request("PING", timeout)?;
        field(&a, "boot_id").ok_or(AgentError::Protocol(a))
    }

    /// `CHECK`: a full verification pass now.
    pub fn check(&mut self, timeout: Duration) -> Result<CheckResult, AgentError> {
        CheckResult::parse(self.request("CHECK", timeout)?)
    }

    /// `STATS`: the agent's counters as key/value pairs.
    pub fn stats(&mut self, timeout: Duration) -> Result<Vec<(String, String)>, AgentError> {
        let a = self.request("STATS", timeout)?;
        Ok(a.split_whitespace()
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect())
    }
}

impl CheckResult {
    /// The agent's answer to `CHECK` (`CHECK PASS ...` or `CHECK FAIL ...`).
    pub fn parse(a: String) -> Result<Self, AgentError> {
        let pass = if a.starts_with("CHECK PASS") {
            true
        } else if a.starts_with("CHECK FAIL") {
            false
        } else {
            return Err(AgentError::Protocol(a));
        };
        Ok(Self {
            pass,
            boot_id: field(&a, "boot_id"),
            pages: field(&a, "pages").and_then(|p| p.parse().ok()),
            line: a,
        })
    }
}

/// The value of `key=value` in an agent answer.
pub fn field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
}

/// Connects and pings until the agent answers or `timeout` passes; returns the client and boot id.
pub fn wait_ready(path: &Path, timeout: Duration) -> Result<(AgentClient, String), AgentError> {
    let deadline = Instant::now() + timeout;
    let mut last: AgentError = AgentError::Timeout(timeout);
    while Instant::now() < deadline {
        match AgentClient::connect(path) {
            Ok(mut c) => match c.ping(Duration::from_millis(700)) {
                Ok(boot) => return Ok((c, boot)),
                Err(e) => last = e,
            },
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_parse() {
        let l = "CHECK PASS pages=42 boot_id=ab12 dirtied=7";
        assert_eq!(field(l, "pages").as_deref(), Some("42"));
        assert_eq!(field(l, "boot_id").as_deref(), Some("ab12"));
        assert_eq!(field(l, "nope"), None);
    }

    #[test]
    fn request_skips_unsolicited_and_stale_lines() {
        let (a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let mut r = BufReader::new(b.try_clone().unwrap());
            let mut w = b;
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            assert_eq!(l, "1 CHECK\n");
            w.write_all(
                b"* READY boot_id=x\n0 PONG\n1 CHECK FAIL bad=1 first_bad=3 pages=9 boot_id=x\n",
            )
            .unwrap();
        });
        let writer = a.try_clone().unwrap();
        let mut c = AgentClient {
            transport: Transport::Socket {
                reader: BufReader::new(a),
                writer,
            },
            next_id: 1,
        };
        let r = c.check(Duration::from_secs(5)).unwrap();
        assert!(!r.pass);
        assert_eq!(r.pages, Some(9));
        t.join().unwrap();
    }
}
