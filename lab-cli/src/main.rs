//! `vmbeam-lab`: VMBeam's lab and bench on the command line. `vmbeam-lab up` runs a virtual
//! IaaS cloud on one machine (cloud VMs as namespaces, each with its own libvirtd, system bus
//! and vmbeamd), `vmbeam-lab exec CVM vmbeam ...` runs the product inside one of them, and
//! `vmbeam-lab bench` reproduces the paper's experiments on a lab of its own.
//!
//! A development and test tool, not part of VMBeam's packages: the product's command line
//! is `vmbeam` (`vmbeam-cli/`), which links neither the lab nor the bench.

mod bench_cmd;
mod lab_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit codes, the same as `vmbeam`'s: 0 success, 1 operation failed, 2 bad usage or input
/// (clap's own), 3 refused, 4 environment not ready (no lab, missing packages or binaries).
pub mod exit {
    pub const FAILED: u8 = 1;
    pub const BAD_INPUT: u8 = 2;
    pub const NOT_READY: u8 = 4;
}

#[derive(Parser)]
#[command(
    name = "vmbeam-lab",
    version,
    about = "VMBeam's lab: a virtual IaaS cloud on one machine, and the paper's experiments on it"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    #[command(flatten)]
    Lab(lab_cmd::LabCmd),
    /// Reproduce the paper's experiments on a lab of its own: zero-copy vs traditional
    Bench(vmbeam_bench::plan::Args),
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
        Cmd::Lab(cmd) => lab_cmd::run(cmd),
        Cmd::Bench(a) => bench_cmd::run(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e
                .downcast_ref::<Coded>()
                .map(|c| c.0)
                .unwrap_or(exit::FAILED);
            eprintln!("vmbeam-lab: {}", chain(&e, code));
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent_and_has_the_lab_at_its_top() {
        Cli::command().debug_assert();
        let names: Vec<String> = Cli::command()
            .get_subcommands()
            .map(|s| s.get_name().to_string())
            .collect();
        for n in ["up", "status", "down", "guest", "exec", "reap", "bench"] {
            assert!(names.iter().any(|x| x == n), "{n} in {names:?}");
        }
        let Cmd::Lab(lab_cmd::LabCmd::Exec { cvm, command }) =
            Cli::try_parse_from(["vmbeam-lab", "exec", "cvm1", "vmbeam", "status"])
                .unwrap()
                .cmd
        else {
            panic!("exec");
        };
        assert_eq!(
            (cvm.as_str(), command.join(" ")),
            ("cvm1", "vmbeam status".into())
        );
    }
}
