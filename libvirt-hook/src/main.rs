//! `vmbeam-hook`: installed as /etc/libvirt/hooks/qemu.d/vmbeam (and in libxl.d/ once a Xen
//! backend exists).
//!
//! libvirt runs it as `vmbeam DOMAIN OP SUBOP EXTRA` with the domain XML on stdin. It never
//! calls libvirt (libvirt holds the domain's lock while a hook runs). Domains without VMBeam
//! metadata pass straight through, with no daemon involved. For beam-enabled domains it asks
//! vmbeamd on the system bus, with a bound on the time; if the daemon does not answer, the
//! hook fails and libvirt fails the operation cleanly (the source keeps running) rather
//! than hang. Only for `migrate` does it print anything: the XML, and nothing else.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use vmbeam_bus::HookProxyBlocking;

/// The namespace of VMBeam's metadata element (a domain without it is none of our business).
const VMBEAM_NS: &str = "https://vmbeam.dev/xmlns/vmbeam/1";
/// How long the whole exchange with the daemon may take.
const TIMEOUT: Duration = Duration::from_secs(25);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut xml = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut xml) {
        eprintln!("vmbeam-hook: cannot read the domain XML from stdin: {e}");
        return ExitCode::FAILURE;
    }
    let prints_xml = args.get(1).map(|op| op == "migrate").unwrap_or(false);
    if !xml.contains(VMBEAM_NS) {
        if prints_xml {
            print!("{xml}");
        }
        return ExitCode::SUCCESS;
    }
    match ask_daemon(&args, &xml) {
        Ok(out) => {
            if prints_xml {
                let mut o = std::io::stdout().lock();
                if o.write_all(out.as_bytes()).and_then(|_| o.flush()).is_err() {
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Err(msg) => {
            eprintln!(
                "vmbeam-hook: {} {}: {msg}",
                args.first().map(String::as_str).unwrap_or("?"),
                args.get(1).map(String::as_str).unwrap_or("?")
            );
            ExitCode::FAILURE
        }
    }
}

fn ask_daemon(args: &[String], xml: &str) -> Result<String, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let args = args.to_vec();
    let xml = xml.to_string();
    // The connection itself may block (a wedged bus): bound everything with one timer.
    std::thread::spawn(move || {
        let r = (|| -> Result<String, String> {
            let conn = zbus::blocking::connection::Builder::system()
                // The outer timer below decides; this one only keeps the thread from lingering.
                .and_then(|b| b.method_timeout(TIMEOUT + Duration::from_secs(5)).build())
                .map_err(|e| {
                    format!("vmbeamd is not reachable on the system bus ({e}); is vmbeamd running?")
                })?;
            let proxy = HookProxyBlocking::new(&conn).map_err(|e| e.to_string())?;
            proxy.hook_event(args, &xml).map_err(|e| match e {
                vmbeam_bus::BeamError::ZBus(zbus::Error::MethodError(name, _, _))
                    if name.as_str() == "org.freedesktop.DBus.Error.ServiceUnknown" =>
                {
                    "vmbeamd is not running (org.vmbeam.VMBeam1 is not on the system bus)"
                        .to_string()
                }
                // Typed errors print as `org.vmbeam.VMBeam1.Error.Name: text`; libvirt shows
                // the text to the user, so give the text.
                other => {
                    let s = other.to_string();
                    match s.split_once(": ") {
                        Some((name, text)) if name.starts_with("org.vmbeam.") => text.to_string(),
                        _ => s,
                    }
                }
            })
        })();
        let _ = tx.send(r);
    });
    rx.recv_timeout(TIMEOUT + Duration::from_secs(2))
        .map_err(|_| format!("vmbeamd did not answer within {} s", TIMEOUT.as_secs()))?
}
