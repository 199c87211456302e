//! The lab on the real machine: up/down without residue, guests booting on every cloud VM,
//! a traditional live migration of a guest dirtying memory with its memory check passing
//! (plain, then back over QEMU's native TLS),
//! the checker catching a corrupted page, and clear errors on bad input.

use std::process::Command;
use std::time::Duration;

use vmbeam_lab::agent::AgentClient;
use vmbeam_tests::{lab, lab_err, lab_ok, LabGuard, Residue};

fn agent(name: &str) -> AgentClient {
    let st = vmbeam_lab::require_state().expect("lab state");
    vmbeam_lab::guest::agent(&st, name).expect("agent").1
}

fn http_from_loadgen(ip: &str) -> String {
    // The guest's web server, from the load generator's namespace (busybox wget is not on
    // the host: use bash's /dev/tcp through `ip netns exec`).
    let script = format!(
        "exec 3<>/dev/tcp/{ip}/80; printf 'GET /stats HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n' >&3; timeout 10 cat <&3"
    );
    let o = Command::new("ip")
        .args([
            "netns",
            "exec",
            vmbeam_lab::net::LOAD_NS,
            "timeout",
            "15",
            "bash",
            "-c",
            &script,
        ])
        .output()
        .expect("run http client");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn up_down_leaves_no_residue_and_bad_input_is_refused() {
    let before = Residue::snapshot();
    // `down` with nothing up.
    let (code, err) = lab_err(&["down"]);
    assert!(err.contains("no lab is up"), "{err}");
    assert_ne!(code, 0);
    {
        let _lab = LabGuard::up(2, &[]);
        // Idempotent up.
        let out = lab_ok(&["up", "--cloud-vms", "2"]);
        assert!(out.contains("already up"), "{out}");
        // Another lab (different shape) while one runs.
        let (_, err) = lab_err(&["up", "--cloud-vms", "3"]);
        assert!(err.contains("already up"), "{err}");
        let status = lab_ok(&["status"]);
        assert!(status.contains("qemu+tcp://198.18.0.11/system"), "{status}");
        assert!(status.contains("qemu+tcp://198.18.0.12/system"), "{status}");
        assert!(status.contains("accelerator:"), "{status}");
        // Each cloud VM has its own hostname, host UUID and private libvirt directories.
        let h1 = lab_ok(&["exec", "cvm1", "hostname"]);
        let h2 = lab_ok(&["exec", "cvm2", "hostname"]);
        assert_eq!((h1.trim(), h2.trim()), ("cvm1", "cvm2"));
        let st = vmbeam_lab::require_state().unwrap();
        assert_ne!(st.cloud_vms[0].host_uuid, st.cloud_vms[1].host_uuid);
        for c in &st.cloud_vms {
            let conn = virt::connect::Connect::open(Some(&c.uri)).expect("libvirt reachable");
            let caps = conn.get_capabilities().unwrap();
            assert!(
                caps.contains(&c.host_uuid),
                "{} reports its own host UUID",
                c.name
            );
        }
        // Both see the same pool.
        let marker = st.pool.join("residue-test-marker");
        std::fs::write(&marker, b"x").unwrap();
        lab_ok(&[
            "exec",
            "cvm2",
            "test",
            "-f",
            &format!("{}/residue-test-marker", vmbeam_lab::POOL_DIR),
        ]);
        // Bad input: unknown cloud VM and guest names.
        let (code, err) = lab_err(&["guest", "create", "g", "--memory", "128", "--on", "cvm9"]);
        assert!(
            err.contains("unknown cloud VM 'cvm9'") && err.contains("cvm1"),
            "{err}"
        );
        assert_eq!(code, 2);
        let (_, err) = lab_err(&["guest", "check", "nosuch"]);
        assert!(err.contains("unknown lab guest 'nosuch'"), "{err}");
        let (_, err) = lab_err(&["exec", "cvm7", "true"]);
        assert!(err.contains("unknown cloud VM"), "{err}");
    }
    let after = Residue::snapshot();
    assert_eq!(before, after, "lab down must leave nothing behind");
}

#[test]
fn shaped_lab_limits_the_cloud_link() {
    let _lab = LabGuard::up(2, &["--bandwidth", "100"]);
    let qd = Command::new("ip")
        .args([
            "netns",
            "exec",
            "vmbeam-cvm1",
            "tc",
            "qdisc",
            "show",
            "dev",
            "eth0",
        ])
        .output()
        .unwrap();
    let qd = String::from_utf8_lossy(&qd.stdout);
    assert!(qd.contains("tbf") && qd.contains("100Mbit"), "{qd}");
}

#[test]
fn guests_boot_on_every_cloud_vm_and_serve_http() {
    let _lab = LabGuard::up(2, &[]);
    for (name, cvm) in [("g1", "cvm1"), ("g2", "cvm2")] {
        lab_ok(&["guest", "create", name, "--memory", "160", "--on", cvm]);
        let out = lab_ok(&["guest", "check", name]);
        assert!(out.starts_with(&format!("PASS {name} on {cvm}")), "{out}");
    }
    let st = vmbeam_lab::require_state().unwrap();
    let ip = &st.guest("g2").unwrap().ip;
    let body = http_from_loadgen(ip);
    assert!(
        body.contains("200") && body.contains("boot_id"),
        "HTTP from the load generator: {body}"
    );
    // A duplicate name is refused and changes nothing.
    let (_, err) = lab_err(&["guest", "create", "g1", "--memory", "160", "--on", "cvm2"]);
    assert!(err.contains("exists already"), "{err}");
    lab_ok(&["guest", "check", "g1"]);
}

#[test]
fn checker_catches_a_corrupted_page() {
    let _lab = LabGuard::up(1, &[]);
    lab_ok(&[
        "guest", "create", "victim", "--memory", "160", "--on", "cvm1",
    ]);
    lab_ok(&["guest", "check", "victim"]);
    let answer = agent("victim")
        .request("CORRUPT 17", Duration::from_secs(10))
        .unwrap();
    assert!(answer.starts_with("OK"), "{answer}");
    let o = lab(&["guest", "check", "victim"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        !o.status.success(),
        "check must fail after corruption: {out}"
    );
    assert!(out.starts_with("FAIL victim"), "{out}");
    assert!(
        out.contains("first_bad=17"),
        "the checker names the corrupted page: {out}"
    );
}

#[test]
fn traditional_live_migration_of_a_dirtying_guest_keeps_memory_intact() {
    let _lab = LabGuard::up(2, &[]);
    lab_ok(&[
        "guest",
        "create",
        "mover",
        "--memory",
        "384",
        "--dirty-rate",
        "2000",
        "--on",
        "cvm1",
    ]);
    let boot_before = agent("mover").ping(Duration::from_secs(10)).unwrap();
    let st = vmbeam_lab::require_state().unwrap();
    let ip = st.guest("mover").unwrap().ip.clone();
    assert!(
        http_from_loadgen(&ip).contains("200"),
        "guest reachable before migration"
    );
    let o = vmbeam_tests::migrate(1, 2, "mover", &["--no-zero-copy"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.contains("traditional"), "{out}");
    let bytes: u64 = out
        .lines()
        .find(|l| l.contains("bytes on wire"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|b| b.parse().ok())
        .expect("bytes on wire in the summary");
    assert!(
        bytes > 100 << 20,
        "a copying migration sends the filled memory: {bytes}"
    );
    let check = lab_ok(&["guest", "check", "mover"]);
    assert!(check.starts_with("PASS mover on cvm2"), "{check}");
    let boot_after = agent("mover").ping(Duration::from_secs(10)).unwrap();
    assert_eq!(
        boot_before, boot_after,
        "same agent run: the guest was moved, not rebooted"
    );
    // The agent kept dirtying at the requested rate on the destination.
    let stats = agent("mover").stats(Duration::from_secs(10)).unwrap();
    let dirtied: u64 = stats
        .iter()
        .find(|(k, _)| k == "dirtied")
        .map(|(_, v)| v.parse().unwrap())
        .unwrap();
    assert!(dirtied > 0);
    // The destination QEMU announced the guest: still reachable from the load generator.
    assert!(
        http_from_loadgen(&ip).contains("200"),
        "guest reachable after migration"
    );
    let status = lab_ok(&["status"]);
    let cvm1_block: String = status
        .lines()
        .skip_while(|l| !l.starts_with("cvm1"))
        .take_while(|l| !l.starts_with("cvm2"))
        .collect();
    assert!(!cvm1_block.contains("mover"), "source undefined: {status}");

    // Back with `--tls` (virsh's flag): QEMU's native TLS carries the stream, with the
    // certificates the lab made for each cloud VM; the memory arrives intact.
    let o = vmbeam_tests::migrate(2, 1, "mover", &["--no-zero-copy", "--tls"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let check = lab_ok(&["guest", "check", "mover"]);
    assert!(check.starts_with("PASS mover on cvm1"), "{check}");
    // `--tls` really makes QEMU use TLS (libvirt adds the credentials at run time): without
    // the destination's server certificate the same migration fails cleanly, and the guest
    // stays on the source, intact.
    let st = vmbeam_lab::require_state().unwrap();
    let cert =
        vmbeam_lab::cvm::host_path(&st.cloud_vms[1], "/etc/libvirt/pki-qemu/server-cert.pem");
    std::fs::rename(&cert, cert.with_extension("away")).unwrap();
    let o = vmbeam_tests::migrate(1, 2, "mover", &["--no-zero-copy", "--tls"]);
    std::fs::rename(cert.with_extension("away"), &cert).unwrap();
    assert!(
        !o.status.success(),
        "a TLS migration without the destination's certificate"
    );
    let check = lab_ok(&["guest", "check", "mover"]);
    assert!(check.starts_with("PASS mover on cvm1"), "{check}");
}
