//! `vmbeam-lab nested bench`: the paper's zero-copy-vs-traditional comparison on the nested
//! lab (cloud VMs that are real QEMU VMs, `vmbeam-host` sharing each guest's RAM device).
//!
//! A guest already running in the nested lab is moved `runs` times zero-copy (`vmbeam
//! migrate --zero-copy`, run inside the source cloud VM) between the first two cloud VMs of
//! the nested cloud, alternating direction, then `runs` times traditionally (`vmbeam migrate
//! --no-zero-copy`: libvirt copies the RAM over the cloud network) between its cloud VM and
//! one of another virtual IaaS cloud on the same host and back (`nested up --other-cloud
//! 1`). Within one cloud a copy cannot run in the host-device pool yet: the destination's
//! ALLOC of a guest the host already holds for the source is refused (`exists`), since the
//! host keeps one device per guest; the other cloud's cloud VM gets a device of its own. Each move records
//! what `vmbeam migrate` reports (total time, downtime, bytes on the migration stream), the
//! bytes the cloud network's bridge carried, and the host CPU time of the cloud VMs' QEMU
//! processes and of vmbeam-host; the guest's memory is verified after each move.
//!
//! Caveat printed with every report: the cloud VMs run under TCG and the guest under TCG
//! inside them (or KVM where the boot probe allows), so times are those of emulation; the
//! ratios and the bytes are what carries over to KVM, not the absolute times.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde::Serialize;
use vmbeam_lab::nested::{self, guest as nguest, NestedState, CLOUD};

use crate::measure::read_pids_cpu;
use crate::stats::median;
use crate::{Error, Result};

/// One move.
#[derive(Debug, Clone, Serialize)]
pub struct NestedRun {
    /// `zero-copy` or `traditional`.
    pub mode: String,
    pub from: String,
    pub to: String,
    /// What `vmbeam migrate` reported.
    pub total_ms: f64,
    pub downtime_ms: f64,
    pub stream_bytes: f64,
    /// Bytes received by the cloud network's bridge from every cloud VM during the move.
    pub cloud_net_bytes: u64,
    /// Host CPU seconds of the cloud VMs' QEMU processes and vmbeam-host during the move.
    pub host_cpu_s: f64,
    /// Wall time of the whole `vmbeam migrate` (inside the source cloud VM).
    pub wall_s: f64,
}

/// Medians of one mode.
#[derive(Debug, Clone, Serialize)]
pub struct NestedMedians {
    pub mode: String,
    pub runs: usize,
    pub total_ms: f64,
    pub downtime_ms: f64,
    pub stream_bytes: f64,
    pub cloud_net_bytes: f64,
    pub host_cpu_s: f64,
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct NestedReport {
    pub guest: String,
    pub accel: String,
    pub runs: Vec<NestedRun>,
    pub medians: Vec<NestedMedians>,
}

/// The caveat every nested report carries.
pub const CAVEAT: &str =
    "TCG in TCG here (the cloud VMs are emulated and the guest is emulated inside them): \
times are emulation's; the bytes and the ratios are what carries over to KVM";

fn field(out: &str, key: &str) -> Option<f64> {
    out.lines()
        .find_map(|l| l.trim_start().strip_prefix(&format!("{key}:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Bytes received by the cloud network's bridge from every cloud VM so far.
pub fn cloud_net_bytes() -> Result<u64> {
    let out = Command::new("ip")
        .args([
            "-n",
            nested::HOST_NETNS,
            "-s",
            "-j",
            "link",
            "show",
            "master",
        ])
        .arg(nested::BRIDGE)
        .output()
        .map_err(crate::io_err("ip"))?;
    let what = format!(
        "ip -n {} -s -j link show master {}",
        nested::HOST_NETNS,
        nested::BRIDGE
    );
    let bad = |detail: String| Error::Parse {
        what: what.clone(),
        detail,
    };
    if !out.status.success() {
        return Err(bad(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let links = v
        .as_array()
        .ok_or_else(|| bad(String::from_utf8_lossy(&out.stdout).into_owned()))?;
    links
        .iter()
        .map(|l| {
            l["stats64"]["rx"]["bytes"]
                .as_u64()
                .ok_or_else(|| bad(format!("no rx byte counter in {l}")))
        })
        .sum()
}

/// The host processes whose CPU the bench counts: each cloud VM's QEMU (the host libvirtd's
/// pid files) and vmbeam-host.
fn host_pids(st: &NestedState) -> Vec<u32> {
    let run = Path::new(nested::RUN_ROOT).join("host-run/libvirt/qemu");
    let mut pids: Vec<u32> = st
        .cloud_vms
        .iter()
        .filter_map(|c| std::fs::read_to_string(run.join(format!("{}.pid", c.domain))).ok())
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    pids.push(st.vmbeam_host.pid);
    pids
}

fn host_cpu(pids: &[u32]) -> Result<f64> {
    Ok(read_pids_cpu(Path::new("/proc"), pids)?.0.seconds())
}

/// Moves `guest` `runs` times each way (see the module docs) and reports.
pub fn run(guest: &str, runs: usize) -> Result<NestedReport> {
    let bad = |m: String| Error::Lab(vmbeam_lab::LabError::BadInput(m));
    if runs == 0 {
        return Err(bad("--runs must be at least 1".into()));
    }
    let st = NestedState::load()?
        .filter(|s| s.complete)
        .ok_or_else(|| bad("no nested lab is up: run `vmbeam-lab nested up`".into()))?;
    let pair: Vec<_> = st
        .cloud_vms
        .iter()
        .filter(|c| c.cloud == CLOUD)
        .take(2)
        .collect();
    let other = st.cloud_vms.iter().find(|c| c.cloud != CLOUD);
    let ([a, b], Some(other)) = (pair.as_slice(), other) else {
        return Err(bad(format!(
            "the nested bench needs two cloud VMs in {CLOUD} and one of another cloud (the copy's \
             destination: within one cloud the host cannot hold a second device for the same \
             guest yet): `vmbeam-lab nested up --cloud-vms 3 --other-cloud 1`"
        )));
    };
    let on = nguest::running_in(guest)?;
    let Some(start) = on.first().filter(|_| on.len() == 1) else {
        return Err(bad(format!(
            "guest {guest} is not running in the nested lab (start it: vmbeam-lab nested guest start {guest})"
        )));
    };
    if start != &a.name && start != &b.name {
        return Err(bad(format!(
            "guest {guest} runs in {start}: the bench moves it between {} and {}",
            a.name, b.name
        )));
    }
    let (_, first) = nguest::check(guest)?;
    let boot = first.boot_id.clone();
    let pids = host_pids(&st);
    let mut here = start.clone();
    let mut out = Vec::new();
    for mode in ["zero-copy", "traditional"] {
        for _ in 0..runs {
            // Zero-copy between the two of the guest's cloud; the copy between the guest's
            // cloud VM and the other cloud's (and back).
            let (from, to) = match (mode, here == a.name, here == other.name) {
                ("zero-copy", true, _) => (*a, *b),
                ("zero-copy", false, _) => (*b, *a),
                (_, _, true) => (other, *a),
                (_, true, _) => (*a, other),
                (_, false, _) => (*b, other),
            };
            let flag = if mode == "zero-copy" {
                "--zero-copy"
            } else {
                "--no-zero-copy"
            };
            let cmd: Vec<String> = [
                "vmbeam",
                "migrate",
                flag,
                "--live",
                "--persistent",
                "--undefinesource",
                guest,
                &to.uri,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let net0 = cloud_net_bytes()?;
            let cpu0 = host_cpu(&pids)?;
            let t = Instant::now();
            let (rc, text) = nested::exec(&from.name, &cmd)?;
            let wall_s = t.elapsed().as_secs_f64();
            let host_cpu_s = host_cpu(&pids)? - cpu0;
            let cloud_net_bytes = cloud_net_bytes()? - net0;
            if rc != 0 {
                return Err(Error::Run(format!(
                    "{mode} {} -> {}: {}",
                    from.name,
                    to.name,
                    text.trim()
                )));
            }
            let (on, check) = nguest::check(guest)?;
            if on != to.name || !check.pass || check.boot_id != boot {
                return Err(Error::Run(format!(
                    "after {mode} {} -> {}: the guest is in {on}: {}",
                    from.name, to.name, check.line
                )));
            }
            here = to.name.clone();
            let get = |k: &str| {
                field(&text, k).ok_or_else(|| {
                    Error::Run(format!("vmbeam migrate printed no `{k}`: {}", text.trim()))
                })
            };
            out.push(NestedRun {
                mode: mode.to_string(),
                from: from.name.clone(),
                to: to.name.clone(),
                total_ms: get("total time")?,
                downtime_ms: get("downtime")?,
                stream_bytes: get("bytes on wire")?,
                cloud_net_bytes,
                host_cpu_s,
                wall_s,
            });
        }
    }
    let medians = ["zero-copy", "traditional"]
        .iter()
        .map(|m| {
            let rs: Vec<_> = out.iter().filter(|r| r.mode == *m).collect();
            let med = |f: &dyn Fn(&NestedRun) -> f64| {
                median(&rs.iter().map(|r| f(r)).collect::<Vec<_>>()).unwrap_or(f64::NAN)
            };
            NestedMedians {
                mode: m.to_string(),
                runs: rs.len(),
                total_ms: med(&|r| r.total_ms),
                downtime_ms: med(&|r| r.downtime_ms),
                stream_bytes: med(&|r| r.stream_bytes),
                cloud_net_bytes: med(&|r| r.cloud_net_bytes as f64),
                host_cpu_s: med(&|r| r.host_cpu_s),
            }
        })
        .collect();
    Ok(NestedReport {
        guest: guest.to_string(),
        accel: st.accel.map_or("tcg".into(), |a| a.accel),
        runs: out,
        medians,
    })
}

/// The report as a Markdown table (medians, and traditional / zero-copy ratios).
pub fn render(r: &NestedReport) -> String {
    let mut s = format!(
        "Nested lab ({} cloud VMs), guest {}: medians of {} move(s) per mode\n\n",
        r.accel,
        r.guest,
        r.medians.first().map_or(0, |m| m.runs)
    );
    s.push_str("| mode | total (ms) | downtime (ms) | stream (bytes) | cloud network (bytes) | host CPU (s) |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|\n");
    for m in &r.medians {
        s.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} |\n",
            m.mode, m.total_ms, m.downtime_ms, m.stream_bytes, m.cloud_net_bytes, m.host_cpu_s
        ));
    }
    if let [z, t] = r.medians.as_slice() {
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        s.push_str(&format!(
            "| traditional / zero-copy | {:.1}x | {:.1}x | {:.0}x | {:.0}x | {:.1}x |\n",
            ratio(t.total_ms, z.total_ms),
            ratio(t.downtime_ms, z.downtime_ms),
            ratio(t.stream_bytes, z.stream_bytes),
            ratio(t.cloud_net_bytes, z.cloud_net_bytes),
            ratio(t.host_cpu_s, z.host_cpu_s),
        ));
    }
    s.push_str(&format!("\n{CAVEAT}.\n"));
    s
}

/// Writes the report's JSON to `dir/nested-bench.json`; returns the path.
pub fn save(r: &NestedReport, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(crate::io_err(dir))?;
    let p = dir.join("nested-bench.json");
    std::fs::write(&p, serde_json::to_vec_pretty(r)?).map_err(crate::io_err(&p))?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_runs_are_refused_before_anything_is_asked() {
        let e = run("g1", 0).unwrap_err();
        assert!(
            matches!(&e, Error::Lab(vmbeam_lab::LabError::BadInput(m)) if m.contains("--runs")),
            "{e}"
        );
    }

    #[test]
    fn reads_the_migrate_summary() {
        let out = "Migration: g1 -> qemu+tcp://198.18.128.12/system completed\n  mode:           zero-copy (x)\n  total time:     6043 ms\n  downtime:       220 ms\n  bytes on wire:  376721 (367.9 KiB)\n";
        assert_eq!(field(out, "total time"), Some(6043.0));
        assert_eq!(field(out, "downtime"), Some(220.0));
        assert_eq!(field(out, "bytes on wire"), Some(376721.0));
        assert_eq!(field(out, "mode"), None);
    }

    #[test]
    fn the_report_has_medians_ratios_and_the_caveat() {
        let m = |mode: &str, k: f64| NestedMedians {
            mode: mode.into(),
            runs: 3,
            total_ms: 1000.0 * k,
            downtime_ms: 100.0 * k,
            stream_bytes: 300_000.0 * k,
            cloud_net_bytes: 400_000.0 * k,
            host_cpu_s: 2.0 * k,
        };
        let r = NestedReport {
            guest: "g".into(),
            accel: "tcg".into(),
            runs: vec![],
            medians: vec![m("zero-copy", 1.0), m("traditional", 10.0)],
        };
        let s = render(&r);
        assert!(
            s.contains("| traditional / zero-copy | 10.0x | 10.0x | 10x | 10x | 10.0x |"),
            "{s}"
        );
        assert!(s.contains("TCG in TCG"), "{s}");
    }
}
