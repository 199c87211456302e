//! OpenStack for real (issue 14): live migration through Nova's API. The control plane of
//! `scripts/openstack.sh up` (Keystone, Glance, Placement, nova-api, conductor, scheduler,
//! MariaDB, RabbitMQ, the Neutron stand-in) sits on the lab's cloud network, and one real
//! nova-compute with VMBeam's driver runs inside each of three lab cloud VMs
//! (`scripts/openstack.sh compute`), each beside its own libvirtd and vmbeamd. Nova boots
//! the lab guest from Glance images; `openstack server migrate --live-migration` and the
//! raw `os-migrateLive` move it zero-copy between the two co-located cloud VMs, and to the
//! third (own pool) by Nova's own migration with a default nova.conf. After each move the
//! harness (`openstack-shim/tests/integration/api_live_migration.py`) checks what Nova
//! says (ACTIVE on the right host, the migration record, Placement's allocations), how it
//! moved (the source compute's log) and the guest agent's memory check.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vmbeam_tests::*;

const NS: &str = "vmbeam-ctl";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn openstack_sh(args: &[&str]) -> Output {
    let o = Command::new(repo().join("scripts/openstack.sh"))
        .args(args)
        .output()
        .expect("run scripts/openstack.sh");
    print!("{}", String::from_utf8_lossy(&o.stdout));
    eprint!("{}", String::from_utf8_lossy(&o.stderr));
    o
}

/// The control plane, stopped (computes first) when dropped, whatever happened.
struct ControlPlane;

impl ControlPlane {
    fn up() -> ControlPlane {
        let o = openstack_sh(&["up", "--ns", NS, "--attach", "vmbeam-hub:vbr-cloud"]);
        assert!(o.status.success(), "scripts/openstack.sh up failed");
        ControlPlane
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let o = openstack_sh(&["down", "--ns", NS]);
        if !o.status.success() && !std::thread::panicking() {
            panic!("scripts/openstack.sh down failed");
        }
    }
}

/// `export K=V` lines of the control plane's openrc.
fn openrc(state: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(state.join("openrc"))
        .expect("openrc")
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
        .collect()
}

fn secret(state: &Path, key: &str) -> String {
    std::fs::read_to_string(state.join("secrets.env"))
        .expect("secrets.env")
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key} in secrets.env"))
        .trim_matches('\'')
        .to_string()
}

#[test]
fn openstack_server_migrate_live_moves_guests_zero_copy() {
    let o = Command::new(repo().join("scripts/openstack.sh"))
        .arg("--venv-path")
        .output()
        .expect("openstack.sh --venv-path");
    let venv = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    let state = PathBuf::from("/var/lib/vmbeam-openstack").join(NS);

    // cvm3 does not share the beam pool: not co-located for VMBeam. Nova's instances
    // directory is on the host's file system, which every cloud VM sees: shared storage, as
    // Nova finds by its own probe, but not a kind libvirt recognises, so every cloud VM's
    // libvirt is told (qemu.conf's shared_filesystems; it must exist when libvirtd starts).
    let instances = state.join("instances");
    std::fs::create_dir_all(&instances).expect("create Nova's instances directory");
    let instances_arg = instances.to_string_lossy();
    let _lab = LabGuard::up(3, &["--own-pool", "cvm3", "--shared-fs", &instances_arg]);
    let _cp = ControlPlane::up();
    let lab_bin = vmbeam_lab_bin();
    let lab_bin = lab_bin.to_string_lossy();
    let o = openstack_sh(&[
        "compute", "--ns", NS, "--lab", &lab_bin, "cvm1", "cvm2", "cvm3",
    ]);
    assert!(o.status.success(), "scripts/openstack.sh compute failed");

    let image: serde_json::Value =
        serde_json::from_str(&lab_ok(&["guest", "image", "--memory", "256"])).expect("JSON");
    let work = tempfile::tempdir().expect("scratch dir");
    let nova_db = format!(
        "mysql+pymysql://nova:{}@{}/nova",
        secret(&state, "DB_NOVA_PASS"),
        std::fs::read_to_string(state.join("addr"))
            .expect("addr")
            .trim()
    );
    let path = format!(
        "{}:{}",
        venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let o = Command::new(venv.join("bin/python"))
        .arg(repo().join("openstack-shim/tests/integration/api_live_migration.py"))
        .args(["--lab", &lab_bin])
        .args(["--kernel", image["kernel"].as_str().expect("kernel")])
        .args(["--initrd", image["initrd"].as_str().expect("initrd")])
        .args(["--cmdline", image["cmdline"].as_str().expect("cmdline")])
        .args(["--memory-mb", "256"])
        .arg("--instances")
        .arg(state.join("instances"))
        .arg("--logs")
        .arg(state.join("log"))
        .args(["--nova-db", &nova_db])
        .arg("--work")
        .arg(work.path())
        .envs(openrc(&state))
        .env("PATH", path)
        .output()
        .expect("run the API harness");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    eprint!("{stderr}");
    let r: serde_json::Value = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .map(|l| serde_json::from_str(l).expect("RESULT is JSON"))
        .unwrap_or_else(|| panic!("no RESULT line; stdout:\n{stdout}"));
    // The whole record (each case's migration record, allocations, VMBeam's log lines,
    // `migration list/show` as an admin sees them) for the README and for failures.
    let logs = repo().join("target/test-logs");
    let _ = std::fs::create_dir_all(&logs);
    let saved = logs.join("nova_api-result.json");
    if let Err(e) = std::fs::write(&saved, format!("{r:#}")) {
        eprintln!("cannot save {}: {e}", saved.display());
    }
    for c in r["cases"].as_array().into_iter().flatten() {
        println!(
            "{}: {} -> {} in {} s ({} bytes, {} ms downtime): {}",
            c["title"],
            c["source"],
            c["dest"],
            c["elapsed_s"],
            c["bytes"],
            c["downtime_ms"],
            if c["ok"] == true {
                "ok".to_string()
            } else {
                c["error"].to_string()
            }
        );
    }
    assert!(
        o.status.success() && r["ok"] == true,
        "the API cases failed: {} (the whole record, also in {}):\n{r:#}",
        r["failed"],
        saved.display()
    );
}
