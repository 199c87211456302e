//! `vmbeam-hook`: installed as /etc/libvirt/hooks/qemu.d/vmbeam (and in libxl.d/ once a Xen
//! backend exists).
//!
//! libvirt runs it as `vmbeam DOMAIN OP SUBOP EXTRA` with the domain XML on stdin. It never
//! calls libvirt (libvirt holds the domain's lock while a hook runs). Domains without VMBeam
//! metadata pass straight through, with no daemon involved. For beam-enabled domains it asks
//! vmbeamd on the system bus, with a bound on the time; if the daemon does not answer, the
//! hook fails and libvirt fails the operation cleanly (the source keeps running) rather
//! than hang. Only where libvirt reads the hook's output as the new domain XML (`migrate
//! begin`, `restore begin`) does it print anything: the XML, and nothing else.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use vmbeam_bus::{ExitClass, HookProxyBlocking};
use vmbeam_core::hook::HookEvent;
/// The namespace of VMBeam's metadata element (a domain without it is none of our business).
use vmbeam_core::metadata::NAMESPACE as VMBEAM_NS;
/// How long the whole exchange with the daemon may take.
const TIMEOUT: Duration = Duration::from_secs(25);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut xml = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut xml) {
        eprintln!("vmbeam-hook: cannot read the domain XML from stdin: {e}");
        return ExitCode::FAILURE;
    }
    let prints_xml = HookEvent::from_args(&args)
        .map(|ev| ev.output_replaces_xml())
        .unwrap_or(false);
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
            // libvirt shows the text to the user: the text, without the D-Bus name.
            proxy.hook_event(args, &xml).map_err(|e| match e.class() {
                ExitClass::NotReady => format!(
                    "vmbeamd is not running (org.vmbeam.VMBeam1 is not on the system bus): {}",
                    e.text()
                ),
                _ => e.text(),
            })
        })();
        let _ = tx.send(r);
    });
    rx.recv_timeout(TIMEOUT + Duration::from_secs(2))
        .map_err(|_| format!("vmbeamd did not answer within {} s", TIMEOUT.as_secs()))?
}
