//! Deciding KVM or TCG by booting the lab's guest kernel for real, not by the existence of
//! /dev/kvm: on some hosts /dev/kvm opens and firmware runs, but a Linux kernel hangs in
//! early boot. The result is cached per (image, QEMU version, host kernel).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::image::GuestImage;
use crate::state::AccelChoice;
use crate::LabError;

/// What a boot probe with one accelerator found.
#[derive(Debug, Clone)]
pub struct ProbeResult {
    pub booted: bool,
    pub elapsed: Duration,
    pub detail: String,
}

/// Boots the image under `accel` and waits for the init marker on the serial console.
pub fn boot_probe(
    image: &GuestImage,
    accel: &str,
    timeout: Duration,
) -> Result<ProbeResult, LabError> {
    let start = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            accel,
            "-machine",
            "pc",
            "-m",
            "192",
            "-nodefaults",
            "-nographic",
            "-no-reboot",
        ])
        .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .args([
            "-append",
            "console=ttyS0 panic=-1 quiet vmbeam.probe=1 vmbeam.mem_mib=8",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| LabError::io("start qemu-system-x86_64 for the boot probe", e))?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.contains("VMBEAM-INIT") {
                let _ = tx.send(());
                break;
            }
        }
    });
    let booted = rx.recv_timeout(timeout).is_ok();
    let elapsed = start.elapsed();
    let exited_early = !booted && matches!(child.try_wait(), Ok(Some(_)));
    let _ = child.kill();
    let out = child.wait_with_output().ok();
    let stderr = out
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .unwrap_or_default();
    let detail = if booted {
        format!("reached init in {} ms", elapsed.as_millis())
    } else if exited_early {
        format!(
            "did not reach init: QEMU exited: {}",
            stderr.lines().last().unwrap_or("")
        )
    } else {
        format!("did not reach init within {} s", timeout.as_secs())
    };
    Ok(ProbeResult {
        booted,
        elapsed,
        detail,
    })
}

fn cache_key(image: &GuestImage) -> String {
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    use sha2::Digest;
    let h = sha2::Sha256::digest(format!("{}|{}|{}", image.id, qemu.trim(), host.trim()));
    hex::encode(&h[..8])
}

/// Chooses the accelerator: KVM if /dev/kvm exists and the kernel boots under it, else TCG
/// (which must boot). Cached in `cache_dir` unless `VMBEAM_REPROBE` is set.
pub fn choose_accel(image: &GuestImage, cache_dir: &Path) -> Result<AccelChoice, LabError> {
    let cache = cache_dir.join(format!("accel-{}.json", cache_key(image)));
    if std::env::var_os("VMBEAM_REPROBE").is_none() {
        if let Some(c) = std::fs::read(&cache)
            .ok()
            .and_then(|b| serde_json::from_slice::<AccelChoice>(&b).ok())
        {
            return Ok(c);
        }
    }
    let kvm_note = if Path::new("/dev/kvm").exists() {
        let r = boot_probe(image, "kvm", Duration::from_secs(8))?;
        if r.booted {
            let c = AccelChoice {
                accel: "kvm".into(),
                domain_type: "kvm".into(),
                reason: format!("boot probe: the guest kernel {} under KVM", r.detail),
                boot_ms: r.elapsed.as_millis() as u64,
            };
            save_cache(&cache, &c);
            return Ok(c);
        }
        format!(
            "/dev/kvm exists but the guest kernel {} under KVM",
            r.detail
        )
    } else {
        "/dev/kvm is absent".to_string()
    };
    let r = boot_probe(image, "tcg", Duration::from_secs(60))?;
    if !r.booted {
        return Err(LabError::Setup(format!(
            "the lab guest boots neither under KVM ({kvm_note}) nor under TCG ({})",
            r.detail
        )));
    }
    let c = AccelChoice {
        accel: "tcg".into(),
        domain_type: "qemu".into(),
        reason: format!("{kvm_note}; under TCG it {}", r.detail),
        boot_ms: r.elapsed.as_millis() as u64,
    };
    save_cache(&cache, &c);
    Ok(c)
}

fn save_cache(path: &Path, c: &AccelChoice) {
    if let Ok(b) = serde_json::to_vec_pretty(c) {
        let _ = std::fs::write(path, b);
    }
}
