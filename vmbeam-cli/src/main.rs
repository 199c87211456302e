//! `vmbeam`: VMBeam's command line. Its arguments are defined in the library (`src/lib.rs`,
//! also what the man pages and completions are made from); this runs them.

mod migrate_cmd;

use std::process::ExitCode;

use clap::Parser;
use vmbeam_cli::{Cli, Cmd};

/// Exit codes: 0 success, 1 operation failed, 2 bad usage or input (clap's own), 3 refused
/// (e.g. --zero-copy impossible), 4 environment not ready (no system bus or vmbeamd).
pub mod exit {
    pub const FAILED: u8 = 1;
    pub const BAD_INPUT: u8 = 2;
    pub const REFUSED: u8 = 3;
    pub const NOT_READY: u8 = 4;
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMBEAM_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // libvirt's default error callback prints every error (even expected look-up misses)
    // to stderr; errors are returned and reported once instead.
    virt::error::clear_error_callback();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Migrate(a) => migrate_cmd::run(a),
        Cmd::Enable { domain } => migrate_cmd::set_enabled(&domain, true),
        Cmd::Disable { domain } => migrate_cmd::set_enabled(&domain, false),
        Cmd::Status => migrate_cmd::status(),
        Cmd::Colocation { desturi } => migrate_cmd::colocation(&desturi),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e
                .downcast_ref::<Coded>()
                .map(|c| c.0)
                .unwrap_or(exit::FAILED);
            eprintln!("vmbeam: {}", chain(&e, code));
            ExitCode::from(code)
        }
    }
}

/// An exit code attached to an error as context.
#[derive(Debug)]
pub struct Coded(pub u8);

impl std::fmt::Display for Coded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit code {}", self.0)
    }
}
impl std::error::Error for Coded {}

/// The whole error chain on one line, skipping the exit-code marker.
fn chain(e: &anyhow::Error, code: u8) -> String {
    let marker = Coded(code).to_string();
    e.chain()
        .filter(|c| c.to_string() != marker)
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}
