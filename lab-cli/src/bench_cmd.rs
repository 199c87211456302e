//! `vmbeam-lab bench`: the paper's experiments on a lab the command brings up and tears down.

use anyhow::Context;
use vmbeam_bench::plan::Args;
use vmbeam_bench::runner::{self, Tools};

use crate::lab_cmd::{agent_binary, bin_dir, lab, vmbeam_binary};
use vmbeam_cli::{exit, Coded};

pub fn run(args: Args) -> anyhow::Result<()> {
    let tools = Tools {
        lab: std::env::current_exe().context("locate the vmbeam-lab binary")?,
        vmbeam: vmbeam_binary()?,
        agent_binary: agent_binary()?,
        bin_dir: bin_dir()?,
    };
    let summary = match runner::run(&args, &tools) {
        Ok(s) => s,
        Err(vmbeam_bench::Error::Lab(e)) => return lab(Err(e)),
        Err(e @ vmbeam_bench::Error::Font { .. }) => {
            return Err(anyhow::Error::new(e).context(Coded(exit::NOT_READY)))
        }
        Err(e) => return Err(e.into()),
    };
    println!(
        "bench: {} runs in {:.0} s ({:.1} min)",
        summary.runs,
        summary.duration_s,
        summary.duration_s / 60.0
    );
    for f in &summary.files {
        println!("  {}", f.display());
    }
    Ok(())
}
