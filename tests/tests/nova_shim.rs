//! The OpenStack Nova shim (openstack-shim/) on the real lab: Nova's own live-migration
//! entry point of `VMBeamLibvirtDriver` (the operation thread and the real
//! `_live_migration_monitor` from the nova package), run inside cloud VM 1 against its real
//! libvirtd and vmbeamd, moves a running beam-enabled guest to cloud VM 2 zero-copy under
//! eventlet, then back from cloud VM 2 under Nova 34's native threading (nova-compute's
//! default); then to cloud VM 3, which does not share the pool, by Nova's own migration with
//! a default nova.conf. The guest agent's memory check passes after each. Python comes from the venv `scripts/test-nova.sh`
//! makes (nova from PyPI); without it this test fails: run that script first.

use std::path::{Path, PathBuf};
use std::process::Command;

use vmbeam_tests::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The venv of `scripts/test-nova.sh` (where it is for the current requirements).
fn nova_venv() -> PathBuf {
    let script = repo().join("scripts/test-nova.sh");
    let o = Command::new(&script)
        .arg("--venv-path")
        .output()
        .expect("run scripts/test-nova.sh --venv-path");
    assert!(
        o.status.success(),
        "{} --venv-path failed",
        script.display()
    );
    let venv = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    assert!(
        venv.join(".complete").is_file() && venv.join("bin/python").is_file(),
        "the Nova shim's venv {} is missing: run scripts/test-nova.sh (it makes it) before this test",
        venv.display()
    );
    venv
}

fn result_line(stdout: &str) -> serde_json::Value {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT line in:\n{stdout}"));
    serde_json::from_str(line).expect("RESULT is JSON")
}

/// Nova's concurrency mode for the harness (`OS_NOVA_DISABLE_EVENTLET_PATCHING`).
#[derive(Clone, Copy, Debug)]
enum Concurrency {
    Eventlet,
    Threading,
}

/// Runs the harness inside cloud VM `from` for lab guest `name` (256 MiB) with destination
/// cloud VM `to`; returns its RESULT after asserting every check it made passed.
fn run_harness(
    venv: &Path,
    name: &str,
    expect: &str,
    (from, to): (u32, u32),
    concurrency: Concurrency,
) -> serde_json::Value {
    let st = vmbeam_lab::require_state().expect("lab state");
    let uuid = st.guest(name).expect("guest").uuid.clone();
    let python = venv.join("bin/python");
    let script = repo().join("openstack-shim/tests/integration/lab_live_migration.py");
    // The shim from this checkout (first on the path), Nova and the rest from the venv.
    let pythonpath = format!("PYTHONPATH={}", repo().join("openstack-shim/src").display());
    let disable = format!(
        "OS_NOVA_DISABLE_EVENTLET_PATCHING={}",
        match concurrency {
            Concurrency::Eventlet => 0,
            Concurrency::Threading => 1,
        }
    );
    let source = cvm_uri(from);
    let (source_host, dest_host) = (format!("cvm{from}"), format!("cvm{to}"));
    let dest_addr = format!("198.18.0.{}", 10 + to);
    let o = lab(&[
        "exec",
        &source_host,
        "env",
        &pythonpath,
        &disable,
        &python.to_string_lossy(),
        &script.to_string_lossy(),
        "--uuid",
        &uuid,
        "--memory-mb",
        "256",
        "--source-uri",
        &source,
        "--source-host",
        &source_host,
        "--dest-host",
        &dest_host,
        "--dest-addr",
        &dest_addr,
        "--expect",
        expect,
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let r = result_line(&format!("{stdout}\n{stderr}"));
    let tail: Vec<&str> = stderr.lines().rev().take(60).collect();
    assert!(
        o.status.success() && r["ok"] == true,
        "the shim's live migration failed the checks {}: {}\nresult: {r:#}\nstderr (tail): {}",
        r["failed"],
        r["error"],
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    let last_save = r["migration_saves"]
        .as_array()
        .and_then(|a| a.last())
        .expect("the migration record was saved");
    assert_eq!(last_save["status"], "completed", "{r:#}");
    let expected = match concurrency {
        Concurrency::Eventlet => "eventlet",
        Concurrency::Threading => "threading",
    };
    assert_eq!(r["concurrency"], expected, "{r:#}");
    for l in r["shim_log"].as_array().expect("log") {
        println!("  {}", l.as_str().unwrap_or_default());
    }
    r
}

#[track_caller]
fn on_and_intact(name: &str, to: u32, from: u32) {
    // The guest agent verifies every page it wrote, now on cloud VM `to`.
    let out = lab_ok(&["guest", "check", name]);
    assert!(out.starts_with(&format!("PASS {name} on cvm{to}")), "{out}");
    assert_eq!(
        qemu_pids(&format!("cvm{from}")).len(),
        0,
        "QEMU left on cvm{from}"
    );
    assert_eq!(qemu_pids(&format!("cvm{to}")).len(), 1, "QEMU on cvm{to}");
}

#[test]
fn nova_live_migration_through_the_shim_is_zero_copy() {
    let venv = nova_venv();
    // cvm3 does not share the beam pool: Nova's own migration moves the guest there.
    let _lab = LabGuard::up(3, &["--own-pool", "cvm3"]);
    lab_ok(&[
        "guest", "create", "nova1", "--memory", "256", "--on", "cvm1",
    ]);
    for (from, to, concurrency) in [
        (1, 2, Concurrency::Eventlet),
        (2, 1, Concurrency::Threading),
    ] {
        let r = run_harness(&venv, "nova1", "zero-copy", (from, to), concurrency);
        assert_eq!(r["job"]["Mode"], "zero-copy", "{r:#}");
        assert_eq!(r["job"]["Phase"], "completed", "{r:#}");
        assert!(
            r["job"]["BytesTransferred"].as_u64().expect("bytes") < 16 << 20,
            "{r:#}"
        );
        on_and_intact("nova1", to, from);
        assert_pool_clean(1);
        println!(
            "nova shim ({concurrency:?}): cvm{from} -> cvm{to} zero-copy in {} s (Nova's loop), {} bytes on the wire, {} ms downtime",
            r["elapsed_s"], r["job"]["BytesTransferred"], r["job"]["Downtime"]
        );
    }
    // Not co-located, with a default nova.conf (no [libvirt] file_backed_memory): Nova's own
    // migration, the guest keeping its shared file memory (the harness checks the
    // destination's XML), and a fresh pool file of its own there.
    let r = run_harness(&venv, "nova1", "nova", (1, 3), Concurrency::Threading);
    assert_eq!(r["dest_memory_backing"]["source"], "file", "{r:#}");
    on_and_intact("nova1", 3, 1);
    assert_pool_clean(0);
    let mut own: Vec<String> = std::fs::read_dir("/run/vmbeam-lab/pool-cvm3")
        .expect("cvm3's pool")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    own.sort();
    assert!(
        own.len() == 2 && own[0].ends_with(".ram") && own[1].ends_with(".ram.owner"),
        "cvm3's own pool holds the guest's fresh file and its record: {own:?}"
    );
    println!(
        "nova shim (Threading): cvm1 -> cvm3 (not co-located) by Nova's own migration in {} s",
        r["elapsed_s"]
    );
}
