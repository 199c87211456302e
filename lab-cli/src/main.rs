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
    vmbeam_cli::init_logging();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Lab(cmd) => lab_cmd::run(cmd),
        Cmd::Bench(a) => bench_cmd::run(a),
    };
    vmbeam_cli::finish("vmbeam-lab", r)
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
        for n in [
            "up", "status", "down", "nested", "guest", "exec", "reap", "bench",
        ] {
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
        let Cmd::Lab(lab_cmd::LabCmd::Nested {
            cmd:
                lab_cmd::NestedCmd::Up {
                    cloud_vms,
                    other_cloud,
                },
        }) = Cli::try_parse_from([
            "vmbeam-lab",
            "nested",
            "up",
            "--cloud-vms",
            "3",
            "--other-cloud",
            "1",
        ])
        .unwrap()
        .cmd
        else {
            panic!("nested up");
        };
        assert_eq!((cloud_vms, other_cloud), (3, 1));
        let Cmd::Lab(lab_cmd::LabCmd::Nested {
            cmd: lab_cmd::NestedCmd::Bench { guest, runs, .. },
        }) = Cli::try_parse_from(["vmbeam-lab", "nested", "bench", "g1", "--runs", "5"])
            .unwrap()
            .cmd
        else {
            panic!("nested bench");
        };
        assert_eq!((guest.as_str(), runs), ("g1", 5));
        assert!(Cli::try_parse_from(["vmbeam-lab", "nested", "up", "--cloud-vms", "x"]).is_err());
    }
}
