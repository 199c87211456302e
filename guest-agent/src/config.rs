//! Configuration: defaults, then `vmbeam.*` keys from the kernel command line, then CLI
//! flags (for running on the host in tests).

use std::net::IpAddr;
use std::path::PathBuf;

/// Where the command channel is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChanSpec {
    /// stdin/stdout; EOF on stdin ends the agent.
    Stdio,
    /// A tty, pty or other file (opened read-write, raw mode if a tty), or a unix socket
    /// (connected to). Reopened whenever it fails.
    Path(PathBuf),
    /// A virtio-serial port found by its name (`/sys/class/virtio-ports/*/name`), e.g.
    /// `org.qemu.guest_agent.0`, the channel Nova gives a guest whose image says
    /// `hw_qemu_guest_agent=yes`. Looked up again at every (re)open: the port may appear
    /// after the agent starts.
    VirtioPort(String),
    /// The virtio-serial port named so, speaking the QEMU guest agent's JSON protocol
    /// (libvirt is the port's client: `virsh qemu-agent-command`), see [`crate::qga`].
    Qga(String),
    /// No channel.
    Off,
}

/// Where console lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleSpec {
    /// stderr.
    Stderr,
    /// A device or file (opened for appending).
    Path(PathBuf),
}

/// The agent's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// MiB of memory to fill.
    pub mem_mib: u64,
    /// Pages/s to dirty.
    pub dirty_rate: u64,
    /// Pages/s the background verifier walks; 0 = continuously (as fast as it can).
    pub verify_rate: u64,
    /// HTTP port; `None` = no HTTP server; `Some(0)` = any free port.
    pub http_port: Option<u16>,
    /// HTTP bind address.
    pub http_addr: IpAddr,
    /// Command channel.
    pub chan: ChanSpec,
    /// Console for READY and status lines.
    pub console: ConsoleSpec,
    /// Whether to mlock the memory.
    pub mlock: bool,
}

/// Usage text for `--help` and errors.
pub const USAGE: &str = "\
usage: vmbeam-guest-agent [OPTIONS]

Fills memory with a verifiable per-page pattern, dirties it at a set rate, verifies it
continuously, and answers a line protocol on a serial port and HTTP.

Settings come from vmbeam.KEY=VALUE on the kernel command line (/proc/cmdline), then
from these flags:
  --mem-mib N          memory to fill, MiB (vmbeam.mem_mib, default 64)
  --dirty-rate R       pages/s to dirty (vmbeam.dirty_rate, default 0)
  --verify-rate R      pages/s for the background verifier, 0 = continuous
                       (vmbeam.verify_rate, default 0)
  --http-port P|off    HTTP port, 0 = any free port (vmbeam.http_port, default 80)
  --http-addr ADDR     HTTP bind address (vmbeam.http_addr, default 0.0.0.0)
  --chan PATH|virtio:NAME|qga:NAME|off
                       command channel: tty, pty, unix socket, the virtio-serial
                       port named NAME, or that port speaking the QEMU guest agent's
                       JSON for libvirt (vmbeam.chan, default /dev/ttyS1 in a lab
                       guest, stdio elsewhere)
  --chan-stdio         command channel on stdin/stdout (EOF on stdin ends the agent)
  --console PATH|-     console for READY/status lines, - = stderr (vmbeam.console,
                       default /dev/ttyS0 in a lab guest, stderr elsewhere)
  --cmdline FILE       read kernel-style settings from FILE instead of /proc/cmdline
  --no-mlock           do not mlock the memory
  -h, --help           this text
A lab guest is recognised by any vmbeam.* key on /proc/cmdline.";

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Run with this configuration.
    Run(Config),
    /// Print [`USAGE`].
    Help,
}

fn set(cfg: &mut Config, key: &str, value: &str) -> Result<(), String> {
    let num = |v: &str| {
        v.parse::<u64>()
            .map_err(|_| format!("{key}: not a number: {v:?}"))
    };
    match key {
        "mem_mib" => {
            let n = num(value)?;
            if n == 0 {
                return Err("mem_mib must be at least 1".into());
            }
            cfg.mem_mib = n;
        }
        "dirty_rate" => cfg.dirty_rate = num(value)?,
        "verify_rate" => cfg.verify_rate = num(value)?,
        "http_port" => {
            cfg.http_port = if value == "off" || value == "none" {
                None
            } else {
                Some(
                    value
                        .parse()
                        .map_err(|_| format!("http_port: not a port: {value:?}"))?,
                )
            }
        }
        "http_addr" => {
            cfg.http_addr = value
                .parse()
                .map_err(|_| format!("http_addr: not an IP address: {value:?}"))?
        }
        "chan" => {
            cfg.chan = match value {
                "off" | "none" => ChanSpec::Off,
                "-" | "stdio" => ChanSpec::Stdio,
                v => {
                    let port = |name: &str| -> Result<String, String> {
                        if name.is_empty() || name.contains('/') {
                            Err(format!("chan: not a virtio port name: {name:?}"))
                        } else {
                            Ok(name.to_string())
                        }
                    };
                    if let Some(name) = v.strip_prefix("virtio:") {
                        ChanSpec::VirtioPort(port(name)?)
                    } else if let Some(name) = v.strip_prefix("qga:") {
                        ChanSpec::Qga(port(name)?)
                    } else {
                        ChanSpec::Path(v.into())
                    }
                }
            }
        }
        "console" => {
            cfg.console = match value {
                "-" | "stderr" => ConsoleSpec::Stderr,
                p => ConsoleSpec::Path(p.into()),
            }
        }
        "mlock" => cfg.mlock = !matches!(value, "0" | "off" | "no" | "false"),
        // Other vmbeam.* keys (ip, gw, probe, ...) belong to /init or the host.
        _ => {}
    }
    Ok(())
}

/// The `vmbeam.KEY=VALUE` pairs of a kernel command line.
pub fn cmdline_pairs(cmdline: &str) -> Vec<(String, String)> {
    cmdline
        .split_whitespace()
        .filter_map(|tok| tok.strip_prefix("vmbeam."))
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv.to_string(), String::new()),
        })
        .collect()
}

/// Builds the configuration from a kernel command line (`None`: read /proc/cmdline) and
/// the program's arguments (without argv[0]).
pub fn parse(args: &[String], cmdline: Option<&str>) -> Result<Parsed, String> {
    // --cmdline FILE must be known before the kernel keys are applied.
    let mut cmdline_text = cmdline.map(str::to_string);
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--cmdline" {
            let f = args.get(i + 1).ok_or("--cmdline needs a file")?;
            cmdline_text = Some(
                std::fs::read_to_string(f)
                    .map_err(|e| format!("cannot read --cmdline file {f}: {e}"))?,
            );
        }
        i += 1;
    }
    let cmdline_text = cmdline_text
        .unwrap_or_else(|| std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    let pairs = cmdline_pairs(&cmdline_text);
    let in_guest = !pairs.is_empty();

    let mut cfg = Config {
        mem_mib: 64,
        dirty_rate: 0,
        verify_rate: 0,
        http_port: Some(80),
        http_addr: IpAddr::from([0, 0, 0, 0]),
        chan: if in_guest {
            ChanSpec::Path("/dev/ttyS1".into())
        } else {
            ChanSpec::Stdio
        },
        console: if in_guest {
            ConsoleSpec::Path("/dev/ttyS0".into())
        } else {
            ConsoleSpec::Stderr
        },
        mlock: true,
    };
    for (k, v) in &pairs {
        set(&mut cfg, k, v).map_err(|e| format!("kernel command line vmbeam.{k}: {e}"))?;
    }

    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if a.starts_with("--") => (f, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => it
                    .next()
                    .cloned()
                    .ok_or_else(|| format!("{name} needs a value")),
            }
        };
        match flag {
            "-h" | "--help" => return Ok(Parsed::Help),
            "--mem-mib" => set(&mut cfg, "mem_mib", &value(flag)?)?,
            "--dirty-rate" => set(&mut cfg, "dirty_rate", &value(flag)?)?,
            "--verify-rate" => set(&mut cfg, "verify_rate", &value(flag)?)?,
            "--http-port" => set(&mut cfg, "http_port", &value(flag)?)?,
            "--http-addr" => set(&mut cfg, "http_addr", &value(flag)?)?,
            "--chan" => set(&mut cfg, "chan", &value(flag)?)?,
            "--chan-stdio" => cfg.chan = ChanSpec::Stdio,
            "--console" => set(&mut cfg, "console", &value(flag)?)?,
            "--cmdline" => {
                value(flag)?;
            }
            "--no-mlock" => cfg.mlock = false,
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
        }
    }
    Ok(Parsed::Run(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str], cmdline: &str) -> Config {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        match parse(&args, Some(cmdline)).unwrap() {
            Parsed::Run(c) => c,
            Parsed::Help => panic!("help"),
        }
    }

    #[test]
    fn host_defaults() {
        let c = run(&[], "BOOT_IMAGE=/vmlinuz root=/dev/sda1 quiet");
        assert_eq!(c.mem_mib, 64);
        assert_eq!(c.dirty_rate, 0);
        assert_eq!(c.http_port, Some(80));
        assert_eq!(c.chan, ChanSpec::Stdio);
        assert_eq!(c.console, ConsoleSpec::Stderr);
    }

    #[test]
    fn kernel_keys_then_flags() {
        let k = "console=ttyS0 vmbeam.mem_mib=256 vmbeam.dirty_rate=5000 vmbeam.ip=198.18.0.5/24 vmbeam.http_port=8080";
        let c = run(&[], k);
        assert_eq!(
            (c.mem_mib, c.dirty_rate, c.http_port),
            (256, 5000, Some(8080))
        );
        assert_eq!(c.chan, ChanSpec::Path("/dev/ttyS1".into()));
        assert_eq!(c.console, ConsoleSpec::Path("/dev/ttyS0".into()));
        let c = run(
            &[
                "--mem-mib",
                "4",
                "--dirty-rate=10",
                "--chan-stdio",
                "--console",
                "-",
                "--http-port",
                "off",
            ],
            k,
        );
        assert_eq!((c.mem_mib, c.dirty_rate, c.http_port), (4, 10, None));
        assert_eq!(c.chan, ChanSpec::Stdio);
        assert_eq!(c.console, ConsoleSpec::Stderr);
        let c = run(
            &["--chan", "/dev/pts/7"],
            "vmbeam.chan=/dev/ttyS2 vmbeam.console=/dev/hvc0",
        );
        assert_eq!(c.chan, ChanSpec::Path("/dev/pts/7".into()));
        assert_eq!(c.console, ConsoleSpec::Path("/dev/hvc0".into()));
        let c = run(
            &[],
            "vmbeam.mem_mib=96 vmbeam.chan=virtio:org.qemu.guest_agent.0",
        );
        assert_eq!(
            c.chan,
            ChanSpec::VirtioPort("org.qemu.guest_agent.0".into())
        );
    }

    #[test]
    fn errors_and_help() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(parse(&args(&["--mem-mib", "x"]), Some("")).is_err());
        assert!(parse(&args(&["--mem-mib", "0"]), Some("")).is_err());
        assert!(parse(&args(&["--bogus"]), Some("")).is_err());
        assert!(parse(&args(&["--mem-mib"]), Some("")).is_err());
        for bad in [
            "vmbeam.chan=virtio:",
            "vmbeam.chan=virtio:../ttyS0",
            "vmbeam.chan=qga:",
        ] {
            let e = parse(&[], Some(bad)).unwrap_err();
            assert!(e.contains("vmbeam.chan"), "{e}");
        }
        assert!(parse(&[], Some("vmbeam.mem_mib=lots"))
            .unwrap_err()
            .contains("vmbeam.mem_mib"));
        assert_eq!(parse(&args(&["-h"]), Some("")), Ok(Parsed::Help));
    }
}
