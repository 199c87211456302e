//! The definition of `vmbeam`'s command line (clap), and nothing else: the binary
//! (`src/main.rs`) runs the commands, and `packaging/gen` renders the man pages and the shell
//! completions from [`command()`], so that they cannot drift from what `vmbeam` accepts.
//!
//! `vmbeam migrate` takes virsh migrate's arguments in virsh's order. (The lab and the bench
//! are `vmbeam-lab`, `lab-cli/`: not part of the product.)

use clap::{Args, CommandFactory, Parser, Subcommand, ValueHint};

/// `vmbeam`'s arguments.
#[derive(Parser, Debug)]
#[command(
    name = "vmbeam",
    version,
    about = "Zero-copy live migration for libvirt-managed virtual IaaS clouds"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// `vmbeam`'s subcommands.
#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Live-migrate a domain (virsh migrate's options and order); zero-copy when co-located
    Migrate(MigrateArgs),
    /// Make a domain beam-enabled (shared memory in the pool, private QMP, VMBeam metadata)
    Enable { domain: String },
    /// Revert `enable`
    Disable { domain: String },
    /// Beam domains, pool files and their owners, running jobs
    Status,
    /// Whether zero-copy to a destination is possible (proven through the pool)
    Colocation {
        #[arg(value_hint = ValueHint::Url)]
        desturi: String,
    },
}

/// `vmbeam migrate`'s arguments: virsh migrate's, in virsh's order.
#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// Require zero-copy migration; fail if the destination is not co-located and proven
    #[arg(long, conflicts_with = "no_zero_copy")]
    pub zero_copy: bool,
    /// Force a traditional (copying) migration
    #[arg(long)]
    pub no_zero_copy: bool,
    /// Live migration
    #[arg(long)]
    pub live: bool,
    /// Peer-to-peer migration (VMBeam always migrates P2P; accepted for virsh compatibility)
    #[arg(long)]
    pub p2p: bool,
    /// Persist the domain on the destination
    #[arg(long)]
    pub persistent: bool,
    /// Undefine the domain on the source
    #[arg(long)]
    pub undefinesource: bool,
    /// Print progress
    #[arg(long)]
    pub verbose: bool,
    /// Encrypt the migration stream with QEMU's native TLS (libvirt's migrate_tls_x509_cert_dir)
    #[arg(long)]
    pub tls: bool,
    /// Suspend the guest after S seconds of live migration (virsh --timeout)
    #[arg(long, value_name = "S")]
    pub timeout: Option<u32>,
    /// The domain XML for the destination (it must keep the memory and VMBeam's metadata for zero-copy)
    #[arg(long = "xml", value_name = "FILE", value_hint = ValueHint::FilePath)]
    pub xml: Option<std::path::PathBuf>,
    /// The persistent definition for the destination (with --persistent)
    #[arg(long = "persistent-xml", value_name = "FILE", value_hint = ValueHint::FilePath, requires = "persistent")]
    pub persistent_xml: Option<std::path::PathBuf>,
    /// Domain name
    pub domain: String,
    /// Destination libvirt URI, e.g. qemu+tcp://cvm2/system
    #[arg(value_hint = ValueHint::Url)]
    pub desturi: String,
    /// Migration data URI, e.g. tcp://198.18.0.12
    #[arg(value_hint = ValueHint::Url)]
    pub migrateuri: Option<String>,
}

/// The whole command tree of `vmbeam`, as clap builds it (for man pages and completions).
pub fn command() -> clap::Command {
    Cli::command()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent_and_holds_only_the_product() {
        command().debug_assert();
        let cmd = command();
        let names: Vec<&str> = cmd.get_subcommands().map(|s| s.get_name()).collect();
        assert_eq!(
            names,
            ["migrate", "enable", "disable", "status", "colocation"]
        );
    }

    #[test]
    fn migrate_takes_virsh_arguments_in_virsh_order() {
        let cli = Cli::try_parse_from([
            "vmbeam",
            "migrate",
            "--zero-copy",
            "--live",
            "--p2p",
            "--persistent",
            "--undefinesource",
            "--timeout",
            "30",
            "web1",
            "qemu+tcp://cvm2/system",
            "tcp://198.18.0.12",
        ])
        .unwrap();
        let Cmd::Migrate(a) = cli.cmd else {
            panic!("migrate");
        };
        assert!(a.zero_copy && a.live && a.p2p && a.persistent && a.undefinesource);
        assert!(!a.no_zero_copy && !a.tls && !a.verbose);
        assert_eq!(a.timeout, Some(30));
        assert_eq!(
            (
                a.domain.as_str(),
                a.desturi.as_str(),
                a.migrateuri.as_deref()
            ),
            ("web1", "qemu+tcp://cvm2/system", Some("tcp://198.18.0.12"))
        );
        assert!(Cli::try_parse_from([
            "vmbeam",
            "migrate",
            "--zero-copy",
            "--no-zero-copy",
            "web1",
            "qemu+tcp://cvm2/system"
        ])
        .is_err());
    }
}

/// Exit codes, shared by `vmbeam` and `vmbeam-lab`: 0 success, 1 operation failed, 2 bad
/// usage or input (clap's own), 3 refused (e.g. --zero-copy impossible), 4 environment not
/// ready (no system bus or vmbeamd; no lab, missing packages or binaries).
pub mod exit {
    pub const FAILED: u8 = 1;
    pub const BAD_INPUT: u8 = 2;
    pub const REFUSED: u8 = 3;
    pub const NOT_READY: u8 = 4;
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

/// Logging for VMBeam's command-line programs (`vmbeam`, `vmbeam-lab`): `tracing` to stderr,
/// filtered by `VMBEAM_LOG` (default `warn`); and libvirt's default error callback, which
/// prints every error (even expected look-up misses), turned off: errors are returned and
/// reported once instead.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMBEAM_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    virt::error::clear_error_callback();
}

/// Ends a command: success, or the whole error chain on one line (`PROG: ...`, without the
/// exit-code marker) and the exit code attached to it ([`exit::FAILED`] when none is).
pub fn finish(prog: &str, r: anyhow::Result<()>) -> std::process::ExitCode {
    let Err(e) = r else {
        return std::process::ExitCode::SUCCESS;
    };
    let code = e
        .downcast_ref::<Coded>()
        .map(|c| c.0)
        .unwrap_or(exit::FAILED);
    let marker = Coded(code).to_string();
    let chain: Vec<String> = e
        .chain()
        .map(|c| c.to_string())
        .filter(|c| *c != marker)
        .collect();
    eprintln!("{prog}: {}", chain.join(": "));
    std::process::ExitCode::from(code)
}
