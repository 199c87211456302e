//! `vmbeam-guest-agent`: see the library crate and README.md.

use vmbeam_guest_agent::config::{self, Parsed, USAGE};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = match config::parse(&args, None) {
        Ok(Parsed::Run(c)) => c,
        Ok(Parsed::Help) => {
            println!("{USAGE}");
            return;
        }
        Err(e) => {
            eprintln!("vmbeam-guest-agent: {e}");
            std::process::exit(2);
        }
    };
    let Err(e) = vmbeam_guest_agent::run(cfg);
    // As PID 1 this exit panics the guest kernel, which the host sees on the console.
    eprintln!("VMBEAM-AGENT FATAL {e}");
    std::process::exit(1);
}
