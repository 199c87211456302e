//! The paper's topology end to end (issue 13, item 4): cloud VMs that are real QEMU VMs under
//! a host libvirtd, `vmbeam-host` on the host giving each guest's RAM a shared memory device,
//! and a guest moved between cloud VMs by `vmbeam migrate` run inside the source cloud VM.
//!
//! One nested lab (`vmbeam-lab nested up --cloud-vms 3 --other-cloud 1`: cvm1 and cvm2 in one
//! virtual IaaS cloud, cvm3 in another) and one guest booted once (TCG in TCG: minutes), then
//! in order:
//! 1. zero-copy cvm1 -> cvm2 and back: memory check, same boot id, under 1 MiB on the cloud
//!    network, the device gone from the source cloud VM afterwards;
//! 2. the destination's QEMU killed while it waits for the stream, then the destination cloud
//!    VM itself destroyed by the host at that point: the migration fails, the guest goes on
//!    at the source, the destination's share is withdrawn or taken back;
//! 3. cvm3, of the other cloud: `--zero-copy` is refused and changes nothing; the automatic
//!    mode moves the guest by a traditional migration; the host never shares with cvm3;
//! 4. `nested down`: nothing of the lab left on the host.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmbeam_lab::nested::{self, guest as nguest, NestedState, CLOUD, HOST_NETNS, OTHER_CLOUD};
use vmbeam_tests::{lab, lab_ok, summary_field, target_dir};

const GUEST: &str = "nz1";

/// `nested down` on drop, also when the test panics (after keeping the cloud VMs' and
/// vmbeam-host's logs in target/test-logs/nested/ when it does).
struct Down;
impl Drop for Down {
    fn drop(&mut self) {
        if let Some(st) = NestedState::load().ok().flatten() {
            if std::thread::panicking() {
                let keep = target_dir().join("../test-logs/nested");
                let _ = std::fs::create_dir_all(&keep);
                for c in &st.cloud_vms {
                    for f in ["vmbeamd.log", "libvirtd.log", "console.log"] {
                        let _ = std::fs::copy(
                            c.dir.join("log").join(f),
                            keep.join(format!("{}-{f}", c.name)),
                        );
                    }
                }
                let _ = std::fs::copy(&st.host_log, keep.join("vmbeam-host.log"));
                eprintln!("nested: logs kept in {}", keep.display());
            }
            let o = lab(&["nested", "down"]);
            eprintln!(
                "nested down: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn state() -> NestedState {
    NestedState::load().unwrap().expect("the nested lab is up")
}

fn cvm(name: &str) -> nested::NestedCvm {
    state()
        .cloud_vms
        .into_iter()
        .find(|c| c.name == name)
        .unwrap()
}

/// `vmbeam migrate` inside cloud VM `from` (the product's CLI against its own vmbeamd).
fn migrate(from: &str, to: &str, mode: &[&str]) -> Output {
    let dest = cvm(to).uri;
    let mut args = vec!["nested", "exec", from, "--", "vmbeam", "migrate"];
    args.extend_from_slice(mode);
    args.extend_from_slice(&["--live", "--persistent", "--undefinesource", GUEST, &dest]);
    lab(&args)
}

/// Bytes received by the cloud network's bridge from every cloud VM so far (the bench's
/// reading).
fn cloud_net_bytes() -> u64 {
    vmbeam_bench::nested::cloud_net_bytes().unwrap()
}

/// vmbeam-host's own view (`vmbeam-host status --json`).
fn host_status() -> Value {
    let out = Command::new(target_dir().join("vmbeam-host"))
        .args(["status", "--json", "--state-dir"])
        .arg(&state().host_state_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The holders of the guest's device in `cloud`: (cloud VM name, role).
fn holders(cloud: &str) -> Vec<(String, String)> {
    let s = host_status();
    let mut h = Vec::new();
    for g in s["guests"].as_array().unwrap() {
        if g["guest"]["cloud"] == cloud {
            for x in g["holders"].as_array().unwrap() {
                h.push((
                    x["name"].as_str().unwrap_or("?").to_string(),
                    x["role"].as_str().unwrap().to_string(),
                ));
            }
        }
    }
    h
}

/// The shmem devices in cloud VM `name`'s definition in the host libvirtd.
fn shmem_in(name: &str) -> usize {
    let out = Command::new("ip")
        .args(["netns", "exec", HOST_NETNS, "virsh", "-c"])
        .arg(nested::host_uri())
        .args(["dumpxml", &cvm(name).domain])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .matches("<shmem ")
        .count()
}

fn wait(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn check(on: &str, boot: &str) {
    let (where_, r) = nguest::check(GUEST).unwrap();
    assert_eq!(where_, on, "{}", r.line);
    assert!(r.pass, "memory check failed in {on}: {}", r.line);
    assert_eq!(
        r.boot_id.as_deref(),
        Some(boot),
        "the guest rebooted: {}",
        r.line
    );
}

fn exec_ok(cvm: &str, cmd: &str) -> String {
    let (rc, out) = nested::exec(cvm, &["sh".into(), "-c".into(), cmd.into()]).unwrap();
    assert_eq!(rc, 0, "{cvm}: {cmd}: {out}");
    out
}

/// One zero-copy move; returns (total ms, downtime ms, bytes on the cloud network).
fn zero_copy(from: &str, to: &str, boot: &str) -> (String, String, u64) {
    let before = cloud_net_bytes();
    let o = migrate(from, to, &["--zero-copy"]);
    let net = cloud_net_bytes() - before;
    let out = text(&o);
    assert!(o.status.success(), "{from} -> {to}: {out}");
    let mode = summary_field(&out, "mode").unwrap_or_default();
    assert!(mode.starts_with("zero-copy"), "{out}");
    assert!(
        net < 1 << 20,
        "{from} -> {to}: {net} bytes on the cloud network (zero-copy sends device state only)"
    );
    check(to, boot);
    // The source let go: its device is unplugged once its QEMU exited, the destination owns.
    wait(
        &format!("{from}'s device unplugged"),
        Duration::from_secs(60),
        || shmem_in(from) == 0,
    );
    assert_eq!(shmem_in(to), 1);
    assert_eq!(holders(CLOUD), vec![(cvm(to).domain, "owner".to_string())]);
    (
        summary_field(&out, "total time").unwrap_or_default(),
        summary_field(&out, "downtime").unwrap_or_default(),
        net,
    )
}

/// A zero-copy migration cvm1 -> cvm2 started on a thread, returned once cvm2's `started`
/// hook holds it (the destination QEMU up and waiting for the stream; the hold lasts the
/// hook's timeout, 20 s).
fn held_at_cvm2() -> std::thread::JoinHandle<Output> {
    let log = cvm("cvm2").dir.join("log/vmbeamd.log");
    let holds = || {
        std::fs::read_to_string(&log)
            .unwrap()
            .matches("fault injection: holding")
            .count()
    };
    let before = holds();
    exec_ok(
        "cvm2",
        "mkdir -p /run/vmbeam && echo 60000 > /run/vmbeam/fault-hold-started-ms",
    );
    let mover = std::thread::spawn(|| migrate("cvm1", "cvm2", &["--zero-copy"]));
    wait("cvm2's hook holding", Duration::from_secs(120), || {
        assert!(
            !mover.is_finished(),
            "the migration ended before the destination's hook held"
        );
        holds() > before
    });
    mover
}

/// The held migration's end: it failed, said the guest keeps running on the source, and
/// the guest's memory checks out in cvm1 with its boot id; returns what `vmbeam` printed.
fn failed_at_source(mover: std::thread::JoinHandle<Output>, boot: &str) -> String {
    let o = mover.join().unwrap();
    let out = text(&o);
    assert!(
        !o.status.success(),
        "the migration should have failed: {out}"
    );
    assert!(out.contains("keeps running on the source"), "{out}");
    check("cvm1", boot);
    out
}

#[test]
fn nested_zero_copy_between_real_cloud_vms() {
    assert!(
        NestedState::load().unwrap().is_none(),
        "a nested lab is already up: vmbeam-lab nested down"
    );
    let _down = Down;
    let t0 = Instant::now();
    let up = lab_ok(&["nested", "up", "--cloud-vms", "3", "--other-cloud", "1"]);
    eprintln!("{up}");
    assert_eq!(cvm("cvm3").cloud, OTHER_CLOUD);
    let up_secs = t0.elapsed().as_secs();

    let t = Instant::now();
    let started = lab_ok(&["nested", "guest", "start", GUEST, "--on", "cvm1"]);
    let boot_secs = t.elapsed().as_secs();
    let (_, r) = nguest::check(GUEST).unwrap();
    assert!(r.pass, "{started}: {}", r.line);
    let boot = r.boot_id.unwrap();
    assert_eq!(
        holders(CLOUD),
        vec![(cvm("cvm1").domain, "owner".to_string())]
    );
    assert_eq!(shmem_in("cvm1"), 1);

    // 1. Zero-copy there and back.
    let there = zero_copy("cvm1", "cvm2", &boot);
    let back = zero_copy("cvm2", "cvm1", &boot);
    eprintln!("zero-copy cvm1 -> cvm2: {there:?}; cvm2 -> cvm1: {back:?} (total, downtime, cloud-network bytes)");

    // 2. The destination's QEMU killed while it waits for the stream (held in its hook).
    let mover = held_at_cvm2();
    exec_ok(
        "cvm2",
        &format!(
            "kill -9 $(cat /run/libvirt/qemu/{GUEST}.pid); rm -f /run/vmbeam/fault-hold-started-ms"
        ),
    );
    failed_at_source(mover, &boot);
    wait("cvm2's share withdrawn", Duration::from_secs(60), || {
        shmem_in("cvm2") == 0
    });
    assert_eq!(
        holders(CLOUD),
        vec![(cvm("cvm1").domain, "owner".to_string())]
    );
    assert_eq!(shmem_in("cvm1"), 1);

    // 2b. The destination cloud VM itself destroyed (by the host) while its hook holds:
    // the migration fails, the guest goes on in cvm1, the share is gone from the ledger.
    let mover = held_at_cvm2();
    let o = Command::new("ip")
        .args(["netns", "exec", HOST_NETNS, "virsh", "-c"])
        .arg(nested::host_uri())
        .args(["destroy", &cvm("cvm2").domain])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let out = failed_at_source(mover, &boot);
    wait("cvm2's share gone", Duration::from_secs(60), || {
        holders(CLOUD) == vec![(cvm("cvm1").domain, "owner".to_string())]
    });
    assert_eq!(shmem_in("cvm1"), 1);
    eprintln!(
        "destination cloud VM destroyed mid-migration: {}",
        out.trim()
    );

    // 3. Another virtual IaaS cloud on the same host: refused with --zero-copy, nothing
    // changes; the automatic mode moves the guest traditionally; never a share with cvm3.
    let o = migrate("cvm1", "cvm3", &["--zero-copy"]);
    let out = text(&o);
    assert!(!o.status.success(), "--zero-copy to another cloud: {out}");
    eprintln!("--zero-copy cvm1 -> cvm3: {}", out.trim());
    check("cvm1", &boot);
    assert_eq!(shmem_in("cvm3"), 0);
    assert_eq!(
        holders(CLOUD),
        vec![(cvm("cvm1").domain, "owner".to_string())]
    );

    let cvm3 = cvm("cvm3").domain;
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let w = watching.clone();
    let cvm3_ = cvm3.clone();
    let watcher = std::thread::spawn(move || {
        let mut seen = Vec::new();
        while w.load(std::sync::atomic::Ordering::Relaxed) {
            for h in holders(CLOUD) {
                if h.0 == cvm3_ {
                    seen.push(h);
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        seen
    });
    let before = cloud_net_bytes();
    let t = Instant::now();
    let o = migrate("cvm1", "cvm3", &[]);
    let trad_secs = t.elapsed().as_secs_f64();
    let net = cloud_net_bytes() - before;
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let seen = watcher.join().unwrap();
    let out = text(&o);
    assert!(o.status.success(), "automatic cvm1 -> cvm3: {out}");
    let mode = summary_field(&out, "mode").unwrap_or_default();
    assert!(mode.starts_with("traditional"), "{out}");
    assert_eq!(seen, vec![], "vmbeam-host shared {CLOUD}'s guest with cvm3");
    check("cvm3", &boot);
    // cvm3's RAM is a device of its own cloud; cvm1's was given back.
    wait("cvm1's device freed", Duration::from_secs(60), || {
        shmem_in("cvm1") == 0 && holders(CLOUD).is_empty()
    });
    assert_eq!(
        holders(OTHER_CLOUD),
        vec![(cvm3.clone(), "owner".to_string())]
    );
    eprintln!("traditional cvm1 -> cvm3: {trad_secs:.1} s, {net} bytes on the cloud network");

    // 4. Destroy, down: nothing of the lab left.
    let gone = nguest::destroy(GUEST).unwrap();
    assert_eq!(gone, vec!["cvm3".to_string()]);
    wait("cvm3's device freed", Duration::from_secs(60), || {
        holders(OTHER_CLOUD).is_empty() && shmem_in("cvm3") == 0
    });
    let st = state();
    let o = lab(&["nested", "down"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!Path::new(nested::RUN_ROOT).exists());
    assert!(!Path::new(nested::LIB_ROOT).exists());
    assert!(!vmbeam_lab::net::netns_exists(HOST_NETNS));
    assert!(!std::fs::read_dir("/dev/shm")
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("vmbeam-nested")));
    for p in [st.holder, st.libvirtd, st.vmbeam_host] {
        assert!(
            !vmbeam_lab::sys::process_alive(p.pid, p.start),
            "{} still runs",
            p.pid
        );
    }
    eprintln!(
        "nested: up {up_secs} s, guest boot {boot_secs} s, whole test {} s",
        t0.elapsed().as_secs()
    );
}
