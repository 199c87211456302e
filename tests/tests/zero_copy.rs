//! Zero-copy live migration on the real lab (libvirtd + QEMU + dbus-daemon + vmbeamd + the
//! guest agent). Every test ends with the agent's memory check passing and nothing leaked;
//! every zero-copy test polls both ends' run state throughout (no split brain).

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use vmbeam_lab::agent::AgentClient;
use vmbeam_tests::*;

fn agent(name: &str) -> AgentClient {
    let st = vmbeam_lab::require_state().expect("lab state");
    vmbeam_lab::guest::agent(&st, name).expect("agent").1
}

fn boot_id(name: &str) -> String {
    agent(name).ping(Duration::from_secs(10)).expect("ping")
}

fn uuid_of(name: &str) -> String {
    vmbeam_lab::require_state()
        .unwrap()
        .guest(name)
        .unwrap()
        .uuid
        .clone()
}

#[track_caller]
fn check_on(name: &str, cvm: &str) {
    let out = lab_ok(&["guest", "check", name]);
    assert!(out.starts_with(&format!("PASS {name} on {cvm}")), "{out}");
}

#[track_caller]
fn ok(o: &Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "failed ({}):\nstdout: {out}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

fn create(name: &str, mem: &str, rate: &str, on: &str, extra: &[&str]) {
    let mut a = vec![
        "guest",
        "create",
        name,
        "--memory",
        mem,
        "--dirty-rate",
        rate,
        "--on",
        on,
    ];
    a.extend_from_slice(extra);
    lab_ok(&a);
}

/// Asserts `vmbeam migrate`'s summary names `mode` (`zero-copy`, `traditional`).
#[track_caller]
fn assert_mode(out: &str, mode: &str) {
    let got = summary_field(out, "mode").unwrap_or_default();
    assert!(got.starts_with(mode), "expected a {mode} migration: {out}");
}

/// Asserts the guest runs on `cvm` only and has x-ignore-shared off.
#[track_caller]
fn settled_on(name: &str, cvm: &str, total_cvms: u32) {
    for i in 1..=total_cvms {
        let c = format!("cvm{i}");
        let n = qemu_pids(&c).len();
        assert_eq!(n, usize::from(c == cvm), "QEMU processes on {c}: {n}");
    }
    assert!(
        !ignore_shared_on(cvm, &uuid_of(name)),
        "x-ignore-shared must be off after the migration"
    );
}

#[test]
fn zero_copy_of_a_2gib_guest_dirtying_10k_pages_per_second() {
    let _lab = LabGuard::up(2, &[]);
    create("big", "2048", "10000", "cvm1", &[]);
    let boot = boot_id("big");
    let watch = SplitBrainWatch::start("big", 2);
    let out = ok(&migrate(1, 2, "big", &["--zero-copy"]));
    watch.finish();
    assert_mode(&out, "zero-copy");
    let bytes: u64 = summary_field(&out, "bytes on wire")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        bytes < 1 << 20,
        "only device state crosses the wire: {bytes} bytes"
    );
    check_on("big", "cvm2");
    assert_eq!(
        boot_id("big"),
        boot,
        "the guest moved; it was not restarted"
    );
    let stats = agent("big").stats(Duration::from_secs(10)).unwrap();
    let rate: u64 = stats
        .iter()
        .find(|(k, _)| k == "achieved_rate")
        .unwrap()
        .1
        .parse()
        .unwrap();
    assert!(
        rate > 1000,
        "the guest kept dirtying memory (achieved {rate} pages/s)"
    );
    settled_on("big", "cvm2", 2);
    assert_pool_clean(1);
}

/// A guest with two vCPUs as threads of one core: libvirt before 11.10 fails an incoming
/// migration to QEMU >= 10 of a guest with several CPU threads ("extra features: ht"), so
/// the pair the lab runs (QEMU 10.0 / libvirt 11.3) is checked both ways, zero-copy and
/// traditional.
#[test]
fn a_two_vcpu_guest_moves_zero_copy_and_back_traditionally() {
    let _lab = LabGuard::up(2, &[]);
    create("smp", "256", "2000", "cvm1", &["--vcpus", "2"]);
    let boot = boot_id("smp");
    let watch = SplitBrainWatch::start("smp", 2);
    let out = ok(&migrate(1, 2, "smp", &["--zero-copy"]));
    watch.finish();
    assert_mode(&out, "zero-copy");
    check_on("smp", "cvm2");
    let info = ok(&virsh(
        &cvm_uri(2),
        &["vcpucount", "smp", "--live", "--active"],
    ));
    assert_eq!(info.trim(), "2", "vCPUs at the destination");
    let xml = ok(&virsh(&cvm_uri(2), &["dumpxml", "smp"]));
    assert!(xml.contains("threads='2'"), "topology kept: {xml}");
    let out = ok(&migrate(2, 1, "smp", &["--no-zero-copy"]));
    assert_mode(&out, "traditional");
    check_on("smp", "cvm1");
    assert_eq!(
        boot_id("smp"),
        boot,
        "the guest moved; it was not restarted"
    );
    settled_on("smp", "cvm1", 2);
    assert_pool_clean(1);
}

#[test]
fn twenty_zero_copy_migrations_back_and_forth() {
    let _lab = LabGuard::up(2, &[]);
    create("pingpong", "256", "2000", "cvm1", &[]);
    let boot = boot_id("pingpong");
    let watch = SplitBrainWatch::start("pingpong", 2);
    for i in 0..20u32 {
        let (from, to) = if i % 2 == 0 { (1, 2) } else { (2, 1) };
        let out = ok(&migrate(from, to, "pingpong", &["--zero-copy"]));
        assert_mode(&out, "zero-copy");
    }
    watch.finish();
    check_on("pingpong", "cvm1");
    assert_eq!(boot_id("pingpong"), boot);
    settled_on("pingpong", "cvm1", 2);
    assert_pool_clean(1);
    // vmbeamd closes every libvirt connection it opened for the migrations (its own
    // libvirtd's and the destination's): leaked ones pile up until libvirtd stops answering.
    for cvm in ["cvm1", "cvm2"] {
        let held = vmbeam_tests::libvirt_clients_of(cvm, "vmbeamd");
        assert!(held.is_empty(), "vmbeamd on {cvm} still holds {held:#?}");
    }
}

#[test]
fn a_guest_moves_a_to_b_to_c() {
    let _lab = LabGuard::up(3, &[]);
    create("nomad", "256", "2000", "cvm1", &[]);
    let watch = SplitBrainWatch::start("nomad", 3);
    ok(&migrate(1, 2, "nomad", &["--zero-copy"]));
    ok(&migrate(2, 3, "nomad", &["--zero-copy"]));
    watch.finish();
    check_on("nomad", "cvm3");
    settled_on("nomad", "cvm3", 3);
    assert_pool_clean(1);
}

#[test]
fn stock_virsh_migration_copies_into_a_fresh_pool_file_then_zero_copy_back() {
    let _lab = LabGuard::up(2, &[]);
    create("classic", "256", "2000", "cvm1", &[]);
    let before = pool_files();
    let o = virsh(
        &cvm_uri(1),
        &[
            "migrate",
            "--live",
            "--p2p",
            "--persistent",
            "--undefinesource",
            "classic",
            &cvm_uri(2),
        ],
    );
    ok(&o);
    check_on("classic", "cvm2");
    let after = pool_files();
    assert_pool_clean(1);
    assert_ne!(
        before, after,
        "the destination got a fresh pool file; the source's was deleted"
    );
    let watch = SplitBrainWatch::start("classic", 2);
    let out = ok(&migrate(2, 1, "classic", &["--zero-copy"]));
    watch.finish();
    assert_mode(&out, "zero-copy");
    check_on("classic", "cvm1");
    assert_eq!(pool_files(), after, "zero-copy keeps the same pool file");
}

#[test]
fn other_cloud_or_unshared_pool_goes_traditional_or_is_refused() {
    let _lab = LabGuard::up(3, &["--cloud-of", "cvm2=other-cloud", "--own-pool", "cvm3"]);
    create("guarded", "256", "1000", "cvm1", &[]);
    let pool_before = pool_files();
    // --zero-copy to another virtual IaaS cloud: refused, nothing changed.
    let o = migrate(1, 2, "guarded", &["--zero-copy"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains("other-cloud"), "says why: {err}");
    check_on("guarded", "cvm1");
    assert_eq!(pool_files(), pool_before);
    // --zero-copy to a cloud VM that does not share the pool: refused, nothing changed.
    let o = migrate(1, 3, "guarded", &["--zero-copy"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains("does not share this pool"), "says why: {err}");
    check_on("guarded", "cvm1");
    assert_eq!(pool_files(), pool_before);
    // Automatic mode: traditional, saying why.
    let out = ok(&migrate(1, 3, "guarded", &[]));
    let mode = summary_field(&out, "mode").unwrap();
    assert!(
        mode.starts_with("traditional") && mode.contains("does not share this pool"),
        "{mode}"
    );
    check_on("guarded", "cvm3");
    let out = ok(&migrate(3, 2, "guarded", &[]));
    assert_mode(&out, "traditional");
    check_on("guarded", "cvm2");
    // cvm2 (another cloud) shares the pool; cvm3's own pool is empty again.
    assert_pool_clean(1);
    let own: Vec<_> = std::fs::read_dir("/run/vmbeam-lab/pool-cvm3")
        .unwrap()
        .collect();
    assert!(own.is_empty(), "cvm3's pool: {own:?}");
}

/// A ticket made by hand, as an attacker (or a bug) would.
fn hand_ticket(key: &[u8], issued_at: u64, dest: &str) -> String {
    use vmbeam_core::ticket::{Ticket, TicketFields, TicketKey};
    let st = vmbeam_lab::require_state().unwrap();
    let g = st.guest("target").unwrap();
    let file = pool_files()
        .into_iter()
        .find(|f| f.ends_with(".ram"))
        .unwrap();
    let ident = vmbeam_core::pool::file_identity(&st.pool.join(&file)).unwrap();
    Ticket::issue(
        &TicketKey::from_bytes(key.to_vec()).unwrap(),
        TicketFields {
            cloud: vmbeam_core::CloudId::new("lab-cloud").unwrap(),
            domain_uuid: vmbeam_core::DomainUuid::new(&g.uuid).unwrap(),
            domain_name: g.name.clone(),
            pool_file: file,
            pool_identity: ident,
            source_host: vmbeam_core::HostId::new("cvm1").unwrap(),
            dest_host: vmbeam_core::HostId::new(dest).unwrap(),
            ttl_secs: 30,
        },
        issued_at,
    )
    .unwrap()
    .encode()
    .unwrap()
}

fn virsh_migrate_with_ticket(ticket: &str) -> Output {
    let xml = ok(&virsh(&cvm_uri(1), &["dumpxml", "--migratable", "target"]));
    let xml = vmbeam_core::carrier::insert_ticket(&xml, ticket).unwrap();
    let f = std::env::temp_dir().join(format!("vmbeam-ticket-test-{}.xml", std::process::id()));
    std::fs::write(&f, xml).unwrap();
    let o = virsh(
        &cvm_uri(1),
        &[
            "migrate",
            "--live",
            "--p2p",
            "--xml",
            &f.to_string_lossy(),
            "target",
            &cvm_uri(2),
        ],
    );
    let _ = std::fs::remove_file(&f);
    o
}

#[test]
fn forged_expired_and_replayed_tickets_are_refused() {
    let _lab = LabGuard::up(2, &[]);
    create("target", "256", "1000", "cvm1", &[]);
    let boot = boot_id("target");
    let key = hex_decode(&std::fs::read_to_string("/run/vmbeam-lab/keys/lab-cloud.key").unwrap());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let watch = SplitBrainWatch::start("target", 2);
    for (what, ticket, expect) in [
        ("forged", hand_ticket(&[0x55; 32], now, "cvm2"), "forged"),
        ("expired", hand_ticket(&key, now - 600, "cvm2"), "expired"),
        (
            "for another destination",
            hand_ticket(&key, now, "cvm9"),
            "destination",
        ),
    ] {
        let o = virsh_migrate_with_ticket(&ticket);
        let err = String::from_utf8_lossy(&o.stderr).to_lowercase();
        assert!(!o.status.success(), "{what} ticket must be refused");
        assert!(err.contains(expect), "{what}: {err}");
        check_on("target", "cvm1");
    }
    // A valid ticket is good once; the source did not arm x-ignore-shared for it, so that
    // attempt fails cleanly too (QEMU refuses the capability mismatch), and replaying the
    // same ticket is refused by the destination.
    let valid = hand_ticket(&key, now, "cvm2");
    let first = virsh_migrate_with_ticket(&valid);
    assert!(
        !first.status.success(),
        "no zero-copy without the source's own job"
    );
    check_on("target", "cvm1");
    let o = virsh_migrate_with_ticket(&valid);
    let err = String::from_utf8_lossy(&o.stderr).to_lowercase();
    assert!(
        !o.status.success() && err.contains("already used"),
        "replayed ticket: {err}"
    );
    watch.finish();
    check_on("target", "cvm1");
    assert_eq!(boot_id("target"), boot, "guest unaffected");
    settled_on("target", "cvm1", 2);
    assert_pool_clean(1);
}

fn hex_decode(s: &str) -> Vec<u8> {
    let s = s.trim();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Starts a zero-copy migration in the background with the destination's `started` hook
/// held for `hold_ms` (QEMU up and waiting for the stream).
fn held_migration(hold_ms: u64) -> std::thread::JoinHandle<Output> {
    std::fs::write(
        "/run/vmbeam-lab/cvm2/run/vmbeam/fault-hold-started-ms",
        hold_ms.to_string(),
    )
    .unwrap();
    std::thread::spawn(|| migrate(1, 2, "victim", &["--zero-copy"]))
}

fn release_hold() {
    let _ = std::fs::remove_file("/run/vmbeam-lab/cvm2/run/vmbeam/fault-hold-started-ms");
}

#[track_caller]
fn wait_dest_qemu() -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(p) = qemu_pids("cvm2").first() {
            return *p;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no destination QEMU appeared");
}

#[track_caller]
fn failed_and_intact(o: Output, boot: &str) {
    release_hold();
    assert!(
        !o.status.success(),
        "the migration must fail: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("keeps running on the source"), "{err}");
    check_on("victim", "cvm1");
    assert_eq!(boot_id("victim"), boot);
    settled_on("victim", "cvm1", 2);
    assert_pool_clean(1);
    let doms = ok(&virsh(&cvm_uri(2), &["list", "--all", "--name"]));
    assert!(
        !doms.contains("victim"),
        "no leftover domain on the destination: {doms}"
    );
}

#[test]
fn killed_destination_and_domjobabort_leave_the_guest_on_the_source() {
    let _lab = LabGuard::up(2, &[]);
    create("victim", "256", "2000", "cvm1", &[]);
    let boot = boot_id("victim");
    let watch = SplitBrainWatch::start("victim", 2);
    // 1. The destination QEMU dies during the migration.
    let m = held_migration(4000);
    let pid = wait_dest_qemu();
    std::thread::sleep(Duration::from_millis(500));
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    failed_and_intact(m.join().unwrap(), &boot);
    // 2. `virsh domjobabort` on the source during the migration.
    let m = held_migration(4000);
    wait_dest_qemu();
    std::thread::sleep(Duration::from_millis(500));
    let a = virsh(&cvm_uri(1), &["domjobabort", "victim"]);
    assert!(
        a.status.success(),
        "domjobabort: {}",
        String::from_utf8_lossy(&a.stderr)
    );
    failed_and_intact(m.join().unwrap(), &boot);
    watch.finish();
    // And a retry succeeds.
    let out = ok(&migrate(1, 2, "victim", &["--zero-copy"]));
    assert!(summary_field(&out, "mode")
        .unwrap()
        .starts_with("zero-copy"));
    check_on("victim", "cvm2");
}

/// The owner record of the pool's one RAM file: (owner, state).
fn only_owner_record() -> (String, String) {
    let records: Vec<String> = pool_files()
        .into_iter()
        .filter(|f| f.ends_with(".ram.owner"))
        .collect();
    assert_eq!(records.len(), 1, "pool: {:?}", pool_files());
    let text = std::fs::read_to_string(format!("/run/vmbeam-lab/pool/{}", records[0])).unwrap();
    let r: vmbeam_core::pool::OwnerRecord = serde_json::from_str(&text).unwrap();
    (r.owner.to_string(), r.state.to_string())
}

/// The source's vmbeamd is killed (SIGKILL) while libvirt's job is in flight, and brought
/// back as a service manager would: libvirt finishes the migration without it, and the
/// restarted daemon's recovery records the hand-over it could not, so the guest is the
/// destination's, intact, never run twice, and the next zero-copy migration (back)
/// succeeds.
#[test]
fn a_source_vmbeamd_killed_mid_migration_settles_the_hand_over_when_it_comes_back() {
    let _lab = LabGuard::up(2, &[]);
    create("victim", "256", "1000", "cvm1", &[]);
    let boot = boot_id("victim");
    let watch = SplitBrainWatch::start("victim", 2);
    let m = held_migration(3000);
    wait_dest_qemu();
    lab_ok(&["crash", "cvm1", "vmbeamd"]);
    let o = m.join().unwrap();
    release_hold();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the CLI lost its daemon: {err}");
    assert!(err.contains("lost contact with vmbeamd"), "{err}");
    // libvirt's own job goes on without vmbeamd: the guest ends on cvm2, and the record
    // stays half done until the source's daemon is back.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !qemu_pids("cvm1").is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(qemu_pids("cvm1").is_empty(), "the source QEMU must exit");
    assert_eq!(
        only_owner_record(),
        ("cvm1".to_string(), "handing-over".to_string())
    );
    let restarted = lab_ok(&["restart"]);
    assert!(restarted.contains("cvm1: restarted vmbeamd"), "{restarted}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while only_owner_record().0 != "cvm2" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        only_owner_record(),
        ("cvm2".to_string(), "active".to_string())
    );
    watch.finish();
    check_on("victim", "cvm2");
    assert_eq!(boot_id("victim"), boot);
    settled_on("victim", "cvm2", 2);
    assert_pool_clean(1);
    let out = ok(&migrate(2, 1, "victim", &["--zero-copy"]));
    assert_mode(&out, "zero-copy");
    check_on("victim", "cvm1");
    assert_eq!(boot_id("victim"), boot);
    settled_on("victim", "cvm1", 2);
    assert_pool_clean(1);
}

/// Two `Migrate` calls for one domain on the bus (the second while the first is mid-flight):
/// the second is refused as busy and changes nothing; the first completes zero-copy and the
/// guest is intact, with no split brain.
#[test]
fn a_second_migrate_of_a_migrating_domain_is_busy_and_changes_nothing() {
    let _lab = LabGuard::up(2, &[]);
    create("victim", "256", "1000", "cvm1", &[]);
    let boot = boot_id("victim");
    let watch = SplitBrainWatch::start("victim", 2);
    let first = held_migration(3000);
    wait_dest_qemu();
    let second = migrate(1, 2, "victim", &["--zero-copy"]);
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(2), "{err}");
    assert!(err.contains("already running"), "{err}");
    release_hold();
    let out = ok(&first.join().unwrap());
    assert_mode(&out, "zero-copy");
    watch.finish();
    check_on("victim", "cvm2");
    assert_eq!(boot_id("victim"), boot);
    settled_on("victim", "cvm2", 1);
}

#[test]
fn destination_start_does_not_write_the_shared_ram() {
    use std::io::Read;
    let _lab = LabGuard::up(2, &[]);
    create("victim", "256", "0", "cvm1", &[]);
    let hash = || {
        let file = pool_files()
            .into_iter()
            .find(|f| f.ends_with(".ram"))
            .unwrap();
        let mut f = std::fs::File::open(format!("/run/vmbeam-lab/pool/{file}")).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut h: u64 = 0xcbf29ce484222325;
        loop {
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                break h;
            }
            for b in &buf[..n] {
                h = (h ^ *b as u64).wrapping_mul(0x100000001b3);
            }
        }
    };
    ok(&virsh(&cvm_uri(1), &["suspend", "victim"]));
    let before = hash();
    let m = held_migration(3000);
    let pid = wait_dest_qemu();
    std::thread::sleep(Duration::from_millis(1000));
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let o = m.join().unwrap();
    release_hold();
    assert!(!o.status.success());
    assert_eq!(
        before,
        hash(),
        "the destination QEMU wrote into the shared RAM"
    );
    ok(&virsh(&cvm_uri(1), &["resume", "victim"]));
    check_on("victim", "cvm1");
    assert_pool_clean(1);
}

#[test]
fn plain_memory_is_refused_for_zero_copy_until_enabled() {
    let _lab = LabGuard::up(2, &[]);
    create("plain", "256", "1000", "cvm1", &["--no-beam"]);
    let o = migrate(1, 2, "plain", &["--zero-copy"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains("not enabled"), "{err}");
    check_on("plain", "cvm1");
    assert_pool_clean(0);
    // An unprivileged caller may look but not act (polkit is not running in the lab, so
    // only root is authorized).
    let vm = vmbeam_bin();
    let nobody = |args: &[&str]| {
        let mut full = vec![
            "exec",
            "cvm1",
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ];
        let vm = vm.to_string_lossy().into_owned();
        full.push(&vm);
        full.extend_from_slice(args);
        lab(&full)
    };
    let o = nobody(&["status"]);
    assert!(
        o.status.success(),
        "read-only status for anyone: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = nobody(&["migrate", "--zero-copy", "plain", &cvm_uri(2)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(
        err.contains("not root") && err.contains("org.vmbeam.VMBeam1.migrate"),
        "{err}"
    );
    check_on("plain", "cvm1");
    // `vmbeam enable` rewrites the definition; it applies at the next start.
    let out = ok(&vmbeam_in("cvm1", &["enable", "plain"]));
    assert!(out.contains("next start"), "{out}");
    ok(&virsh(&cvm_uri(1), &["destroy", "plain"]));
    ok(&virsh(&cvm_uri(1), &["start", "plain"]));
    let sock = "/run/vmbeam-lab/cvm1/run/vmbeam/lab/plain.agent";
    vmbeam_lab::agent::wait_ready(std::path::Path::new(sock), Duration::from_secs(60))
        .expect("agent after restart");
    assert_pool_clean(1);
    let watch = SplitBrainWatch::start("plain", 2);
    let out = ok(&migrate(1, 2, "plain", &["--zero-copy"]));
    watch.finish();
    assert_mode(&out, "zero-copy");
    check_on("plain", "cvm2");
    assert_pool_clean(1);
}

#[test]
fn a_missing_or_hung_destination_daemon_fails_the_migration_cleanly() {
    let _lab = LabGuard::up(2, &[]);
    create("lonely", "256", "1000", "cvm1", &[]);
    let boot = boot_id("lonely");
    let st = vmbeam_lab::require_state().unwrap();
    let dest = st.cloud_vm("cvm2").unwrap().clone();
    // The lab records each daemon's reaper (`vmbeam-lab reap`); vmbeamd is its child.
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", dest.vmbeamd_pid)).unwrap();
    let vmbeamd: u32 = children
        .split_whitespace()
        .next()
        .expect("vmbeamd under its reaper")
        .parse()
        .unwrap();
    assert!(std::fs::read_to_string(format!("/proc/{vmbeamd}/cmdline"))
        .unwrap()
        .contains("vmbeamd"));
    // 1. vmbeamd hung (stopped) on the destination: the hook gives up within its bound and
    //    libvirt fails the migration; the guest keeps running on the source.
    Command::new("kill")
        .args(["-STOP", &vmbeamd.to_string()])
        .status()
        .unwrap();
    let t = Instant::now();
    let o = virsh(
        &cvm_uri(1),
        &["migrate", "--live", "--p2p", "lonely", &cvm_uri(2)],
    );
    let took = t.elapsed();
    Command::new("kill")
        .args(["-CONT", &vmbeamd.to_string()])
        .status()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "the migration must fail while the daemon hangs"
    );
    assert!(
        err.contains("vmbeam-hook") && err.contains("did not answer"),
        "{err}"
    );
    assert!(took < Duration::from_secs(60), "bounded: {took:?}");
    check_on("lonely", "cvm1");
    // 2. vmbeamd absent on the destination: refused at once, same outcome.
    Command::new("kill")
        .args(["-KILL", &vmbeamd.to_string()])
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let o = virsh(
        &cvm_uri(1),
        &["migrate", "--live", "--p2p", "lonely", &cvm_uri(2)],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("vmbeamd is not running"), "{err}");
    // Without a destination daemon there is no proof of co-location: --zero-copy refuses.
    let o = migrate(1, 2, "lonely", &["--zero-copy"]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    check_on("lonely", "cvm1");
    assert_eq!(boot_id("lonely"), boot);
    settled_on("lonely", "cvm1", 2);
    assert_pool_clean(1);
    // `lab up` repairs the cloud VM; zero-copy works again.
    let out = lab_ok(&["up", "--cloud-vms", "2"]);
    assert!(out.contains("restarted vmbeamd"), "{out}");
    let out = ok(&migrate(1, 2, "lonely", &["--zero-copy"]));
    assert_mode(&out, "zero-copy");
    check_on("lonely", "cvm2");
}

/// Runs `program args` inside cloud VM `cvm` as `nobody` (no capabilities, no groups).
fn as_nobody_in(cvm: &str, program: &str, args: &[&str]) -> Output {
    let mut a = vec![
        "exec",
        cvm,
        "setpriv",
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        program,
    ];
    a.extend_from_slice(args);
    lab(&a)
}

/// The jobs vmbeamd on `cvm` has (its `Jobs` property), as busctl prints them.
fn jobs_on(cvm: &str) -> String {
    let o = lab(&[
        "exec",
        cvm,
        "busctl",
        "get-property",
        "org.vmbeam.VMBeam1",
        "/org/vmbeam/VMBeam1",
        "org.vmbeam.VMBeam1.Manager",
        "Jobs",
    ]);
    ok(&o)
}

/// What a caller may not do changes nothing: an unprivileged user's Migrate, Enable, Disable
/// and Cancel are refused by vmbeamd itself (polkit, which the lab's buses do not run, is the
/// only way to grant them; the lab's bus policy lets every call through, so the refusal is
/// vmbeamd's), while Status stays readable; and a Migrate with an unknown option or a
/// wrongly typed one is refused before vmbeamd acts: no job, the guest where it was.
#[test]
fn unprivileged_callers_and_bad_options_are_refused_and_change_nothing() {
    let _lab = LabGuard::up(2, &[]);
    create("victim", "192", "500", "cvm1", &[]);
    let boot = boot_id("victim");
    let bin = vmbeam_bin();
    let bin = bin.to_str().unwrap();
    let dest = cvm_uri(2);
    for args in [
        vec!["migrate", "--zero-copy", "--live", "victim", dest.as_str()],
        vec!["enable", "victim"],
        vec!["disable", "victim"],
    ] {
        let o = as_nobody_in("cvm1", bin, &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(3), "{args:?}: {err}");
        assert!(
            err.contains("polkit") && err.contains("uid 65534"),
            "{args:?}: {err}"
        );
    }
    let o = as_nobody_in("cvm1", bin, &["status"]);
    assert!(ok(&o).contains("victim"), "status stays readable");
    assert!(jobs_on("cvm1").contains("ao 0"), "no job was made");
    // Cancel of root's job by nobody: refused, and the migration completes.
    let m = held_migration(3000);
    wait_dest_qemu();
    let jobs = jobs_on("cvm1");
    let path = jobs
        .split_whitespace()
        .find(|w| w.contains("/jobs/"))
        .unwrap_or_else(|| panic!("no job in {jobs}"))
        .trim_matches('"')
        .to_string();
    let c = as_nobody_in(
        "cvm1",
        "busctl",
        &[
            "call",
            "org.vmbeam.VMBeam1",
            &path,
            "org.vmbeam.VMBeam1.Job",
            "Cancel",
        ],
    );
    let err = String::from_utf8_lossy(&c.stderr);
    assert!(!c.status.success() && err.contains("polkit"), "{err}");
    release_hold();
    assert_mode(&ok(&m.join().unwrap()), "zero-copy");
    check_on("victim", "cvm2");
    // Unknown and mistyped options never reach vmbeamd's engine.
    let back = cvm_uri(1);
    for opts in [
        vec!["1", "bogus", "b", "true"],
        vec!["1", "live", "s", "yes"],
    ] {
        let mut a = vec![
            "exec",
            "cvm2",
            "busctl",
            "call",
            "org.vmbeam.VMBeam1",
            "/org/vmbeam/VMBeam1",
            "org.vmbeam.VMBeam1.Manager",
            "Migrate",
            "ssa{sv}",
            "victim",
            back.as_str(),
        ];
        a.extend_from_slice(&opts);
        let o = lab(&a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{opts:?} must be refused");
        // zbus's InvalidArgs, whose text busctl prints: serde's account of the bad key.
        assert!(
            err.contains("unknown field `bogus`")
                || err.contains("expected a value of signature `b`"),
            "{opts:?}: {err}"
        );
    }
    assert!(jobs_on("cvm2").contains("ao 0"), "no job was made");
    check_on("victim", "cvm2");
    assert_eq!(boot_id("victim"), boot);
    settled_on("victim", "cvm2", 2);
    assert_pool_clean(1);
}

/// Many migrations at once: four dirtying guests, two on each cloud VM, all moved zero-copy
/// to the other side at the same time, then all back at the same time. Every guest stays
/// intact (same boot, memory check), no two QEMUs ever run one guest, `x-ignore-shared` is off
/// everywhere afterwards, and the pool holds exactly one file and record per guest.
#[test]
fn four_guests_migrating_both_ways_at_once_stay_intact() {
    let _lab = LabGuard::up(2, &[]);
    let guests = [("g1", 1u32), ("g2", 1), ("g3", 2), ("g4", 2)];
    for (g, on) in guests {
        create(g, "160", "500", &format!("cvm{on}"), &[]);
    }
    let boots: Vec<String> = guests.iter().map(|(g, _)| boot_id(g)).collect();
    let watches: Vec<SplitBrainWatch> = guests
        .iter()
        .map(|(g, _)| SplitBrainWatch::start(g, 2))
        .collect();
    for round in 0..2u32 {
        let threads: Vec<_> = guests
            .iter()
            .map(|&(g, on)| {
                let from = if round == 0 { on } else { 3 - on };
                std::thread::spawn(move || (g, from, migrate(from, 3 - from, g, &["--zero-copy"])))
            })
            .collect();
        for t in threads {
            let (g, from, o) = t.join().unwrap();
            let out = ok(&o);
            assert_mode(&out, "zero-copy");
            check_on(g, &format!("cvm{}", 3 - from));
        }
    }
    for w in watches {
        w.finish();
    }
    for ((g, on), boot) in guests.iter().zip(&boots) {
        check_on(g, &format!("cvm{on}"));
        assert_eq!(&boot_id(g), boot, "{g} rebooted");
        assert!(
            !ignore_shared_on(&format!("cvm{on}"), &uuid_of(g)),
            "{g}: x-ignore-shared must be off"
        );
    }
    assert_eq!(qemu_pids("cvm1").len() + qemu_pids("cvm2").len(), 4);
    assert_pool_clean(4);
}

/// `vmbeam migrate --xml FILE` (as Nova passes its rewritten XML): a destination XML that
/// changes what libvirt lets change (here the description) moves zero-copy and the
/// destination runs that XML; one that changes the memory is refused under `--zero-copy`,
/// naming the difference, and changes nothing.
#[test]
fn a_callers_destination_xml_moves_zero_copy_when_it_keeps_the_memory() {
    let _lab = LabGuard::up(2, &[]);
    create("victim", "192", "500", "cvm1", &[]);
    let boot = boot_id("victim");
    let xml = ok(&virsh(&cvm_uri(1), &["dumpxml", "--migratable", "victim"]));
    let dir = tempfile_dir();
    let good = dir.join("dest.xml");
    std::fs::write(
        &good,
        xml.replacen(
            "</name>",
            "</name>\n  <description>moved with the callers XML</description>",
            1,
        ),
    )
    .unwrap();
    let bad = dir.join("bigger.xml");
    let mem = xml
        .lines()
        .find(|l| l.trim_start().starts_with("<memory"))
        .unwrap()
        .to_string();
    std::fs::write(
        &bad,
        xml.replace(&mem, "  <memory unit='KiB'>393216</memory>"),
    )
    .unwrap();
    let dest = cvm_uri(2);
    let o = vmbeam_in(
        "cvm1",
        &[
            "migrate",
            "--zero-copy",
            "--live",
            "--xml",
            bad.to_str().unwrap(),
            "victim",
            &dest,
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains("the memory size"), "{err}");
    check_on("victim", "cvm1");
    let watch = SplitBrainWatch::start("victim", 2);
    let out = ok(&vmbeam_in(
        "cvm1",
        &[
            "migrate",
            "--zero-copy",
            "--live",
            "--persistent",
            "--undefinesource",
            "--xml",
            good.to_str().unwrap(),
            "victim",
            &dest,
        ],
    ));
    assert_mode(&out, "zero-copy");
    watch.finish();
    let there = ok(&virsh(&dest, &["dumpxml", "victim"]));
    assert!(there.contains("moved with the callers XML"), "{there}");
    check_on("victim", "cvm2");
    assert_eq!(boot_id("victim"), boot);
    settled_on("victim", "cvm2", 2);
    assert_pool_clean(1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A private directory under the host's /tmp (which the cloud VMs see as theirs).
fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("vmbeam-xml-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
