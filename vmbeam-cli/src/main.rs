//! `vmbeam`: VMBeam's command line. Its arguments are defined in the library (`src/lib.rs`,
//! also what the man pages and completions are made from); this runs them.

mod migrate_cmd;

use std::process::ExitCode;

use clap::Parser;
use vmbeam_cli::{Cli, Cmd};

fn main() -> ExitCode {
    vmbeam_cli::init_logging();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Migrate(a) => migrate_cmd::run(a),
        Cmd::Enable { domain } => migrate_cmd::set_enabled(&domain, true),
        Cmd::Disable { domain } => migrate_cmd::set_enabled(&domain, false),
        Cmd::Status => migrate_cmd::status(),
        Cmd::Colocation { desturi } => migrate_cmd::colocation(&desturi),
    };
    vmbeam_cli::finish("vmbeam", r)
}
