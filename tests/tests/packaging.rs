//! VMBeam's Debian and RPM packages (`scripts/package.sh`), the way a cloud VM gets them.
//!
//! Both packages are built twice from the binaries in target/<profile> (packaging revisions
//! 1 and 2, for the upgrade), then:
//! - the .deb passes lintian (no errors; warnings only those packaging/lintian-warnings.txt
//!   lists with a reason) and the .rpm rpmlint (packaging/rpm/rpmlint.toml); the .rpm's
//!   files, modes, dependencies and scriptlets are checked with `rpm -qp`;
//! - the .deb is installed, upgraded, removed, reinstalled and purged with dpkg in a throwaway
//!   Debian 12 root, without and with systemd "running" (a logging stand-in for systemctl),
//!   checking every file, the unit, the hook, the configuration and key, and what is left;
//! - installed where systemd "runs", its D-Bus policy and polkit actions are loaded by a real
//!   dbus-daemon and polkitd in such a root and enforced against an unprivileged caller;
//! - the .rpm is installed, upgraded and erased with `rpm --root` in such a root, scriptlets
//!   running for real.
//!
//! The root comes from debootstrap, cached as a tarball in /var/cache/vmbeam-pkgtest (the
//! first run downloads about 100 MB from the Debian mirror). Every command in a root runs in
//! its own mount, UTS and PID namespaces: host name `pkgtest-cvm`, nothing it starts survives
//! it, and it cannot see (or signal) the host's processes. Needs root on Debian 12.

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// Debian packages of the throwaway root, beyond debootstrap's minbase: what the .deb
/// depends on (libvirt0, a system bus), and the D-Bus test tool and polkitd (a Recommends,
/// which needs logind) for the policy checks.
const ROOT_PACKAGES: &str = "libvirt0,dbus,dbus-tests,polkitd,libpam-systemd";
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
const CACHE_DIR: &str = "/var/cache/vmbeam-pkgtest";
const HOST_NAME: &str = "pkgtest-cvm";

/// Non-directory files of the .deb (man pages of subcommands are matched by pattern).
const DEB_FILES: &[&str] = &[
    "/etc/libvirt/hooks/qemu.d/vmbeam",
    "/etc/vmbeam/vmbeam.conf",
    "/lib/systemd/system/vmbeamd.service",
    "/usr/bin/vmbeam",
    "/usr/libexec/vmbeam/vmbeam-hook",
    "/usr/sbin/vmbeamd",
    "/usr/share/bash-completion/completions/vmbeam",
    "/usr/share/dbus-1/system-services/org.vmbeam.VMBeam1.service",
    "/usr/share/dbus-1/system.d/org.vmbeam.VMBeam1.conf",
    "/usr/share/doc/vmbeam/README.md",
    "/usr/share/doc/vmbeam/changelog.Debian.gz",
    "/usr/share/doc/vmbeam/changelog.gz",
    "/usr/share/doc/vmbeam/copyright",
    "/usr/share/fish/vendor_completions.d/vmbeam.fish",
    "/usr/share/man/man1/vmbeam.1.gz",
    "/usr/share/man/man1/vmbeam-migrate.1.gz",
    "/usr/share/man/man8/vmbeamd.8.gz",
    "/usr/share/polkit-1/actions/org.vmbeam.VMBeam1.policy",
    "/usr/share/zsh/vendor-completions/_vmbeam",
];

/// Non-directory files of the .rpm (same pattern rule for man pages).
const RPM_FILES: &[&str] = &[
    "/etc/libvirt/hooks/qemu.d/vmbeam",
    "/etc/vmbeam/vmbeam.conf",
    "/usr/bin/vmbeam",
    "/usr/lib/systemd/system-preset/90-vmbeam.preset",
    "/usr/lib/systemd/system/vmbeamd.service",
    "/usr/libexec/vmbeam/vmbeam-hook",
    "/usr/sbin/vmbeamd",
    "/usr/share/bash-completion/completions/vmbeam",
    "/usr/share/dbus-1/system-services/org.vmbeam.VMBeam1.service",
    "/usr/share/dbus-1/system.d/org.vmbeam.VMBeam1.conf",
    "/usr/share/doc/vmbeam/CHANGELOG.md",
    "/usr/share/doc/vmbeam/README.md",
    "/usr/share/fish/vendor_completions.d/vmbeam.fish",
    "/usr/share/licenses/vmbeam/COPYRIGHT",
    "/usr/share/man/man1/vmbeam.1.gz",
    "/usr/share/man/man1/vmbeam-migrate.1.gz",
    "/usr/share/man/man8/vmbeamd.8.gz",
    "/usr/share/polkit-1/actions/org.vmbeam.VMBeam1.policy",
    "/usr/share/zsh/site-functions/_vmbeam",
];

/// Directories the packages own (and their contents may not).
const STATE_DIRS: &[&str] = &["/var/lib/vmbeam", "/var/lib/vmbeam/pool"];

const HOOK: &str = "/usr/libexec/vmbeam/vmbeam-hook";

/// bookworm-backports' libvirt0 (libvirt 11.3, what scripts/setup.sh installs by default).
const BACKPORTS_LIBVIRT0: &str = "11.3.0-2~bpo12+1";

/// A domain without VMBeam metadata: the hook must not touch it.
const PLAIN_XML: &str = "<domain type='kvm'>
  <name>guest1</name>
  <uuid>6e3b1e9a-1b2c-4d5e-8f90-0123456789ab</uuid>
  <memory unit='KiB'>1048576</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
</domain>
";

/// A beam-enabled domain (`vmbeam enable`'s metadata).
fn beam_xml() -> String {
    format!(
        "<domain type='kvm'>
  <name>guest1</name>
  <uuid>6e3b1e9a-1b2c-4d5e-8f90-0123456789ab</uuid>
  <memory unit='KiB'>1048576</memory>
  <metadata>
    <vmbeam:beam xmlns:vmbeam=\"{}\">
      <vmbeam:cloud>default</vmbeam:cloud>
      <vmbeam:pool>/var/lib/vmbeam/pool</vmbeam:pool>
      <vmbeam:owner>{HOST_NAME}</vmbeam:owner>
      <vmbeam:generation>1</vmbeam:generation>
    </vmbeam:beam>
  </metadata>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
</domain>
",
        vmbeam_core::metadata::NAMESPACE
    )
}

/// Stands in for systemctl where a test says systemd runs: logs its arguments, reports
/// libvirtd.service active (so the hook reload shows) and vmbeamd.service enabled. Offline
/// calls (`--root=`, deb-systemd-helper's enabling) go to the real systemctl.
const FAKE_SYSTEMCTL: &str = r#"#!/bin/sh
echo "$*" >>/var/log/fake-systemctl.log
case "$*" in
  *--root=*) exec /usr/bin/systemctl "$@" ;;
  *--version*) echo "systemd 252 (252)" ;;
  *is-active*libvirtd.service*) exit 0 ;;
  *is-active*) exit 3 ;;
  *is-enabled*) echo enabled ;;
esac
exit 0
"#;

/// Stands in for a running libvirtd without systemd: a pid file and a SIGHUP counter. The
/// pid file is its readiness: written only once the SIGHUP trap is in place, so a SIGHUP sent
/// to the pid in it is counted, never fatal (SIGHUP's default action ends a process).
const FAKE_LIBVIRTD: &str = r#"#!/bin/sh
trap 'echo hup >>/run/libvirtd.hups' HUP
echo $$ >/run/libvirtd.pid
while :; do sleep 0.1; done
"#;

/// Shell (in a root) that starts FAKE_LIBVIRTD in the background and waits, at most 30 s,
/// until it is ready (its pid file is written), failing if it dies or never gets there.
/// `env --default-signal=HUP`: a shell cannot trap a signal that was ignored when it started
/// (POSIX; dash ignores such a `trap` silently), and dispositions are inherited through
/// fork and exec, so under `nohup` (or any runner that ignores SIGHUP) the stand-in would
/// ignore the postinst's SIGHUP and count nothing.
const START_FAKE_LIBVIRTD: &str = "env --default-signal=HUP /usr/local/sbin/libvirtd & \
    n=0; until [ -s /run/libvirtd.pid ]; do \
      kill -0 $! 2>/dev/null || { echo 'the libvirtd stand-in died' >&2; exit 1; }; \
      n=$((n+1)); \
      [ $n -le 300 ] || { echo 'the libvirtd stand-in is not ready after 30 s' >&2; exit 1; }; \
      sleep 0.1; \
    done";

/// Shell (in the same root and namespaces, before they end and take the stand-in with them)
/// that waits, at most 30 s, until FAKE_LIBVIRTD has recorded a SIGHUP: the signal is
/// handled asynchronously (the trap runs when the stand-in's shell next gets to it, after
/// its current `sleep`), so `kill` returning in the postinst does not mean it is counted.
const AWAIT_FAKE_LIBVIRTD_HUP: &str = "n=0; \
    until [ -s /run/libvirtd.hups ] || [ $n -ge 300 ]; do n=$((n+1)); sleep 0.1; done; \
    if kill -0 \"$(cat /run/libvirtd.pid)\" 2>/dev/null; then s=alive; else s=dead; fi; \
    echo \"libvirtd stand-in: $s\"";

// ---------------------------------------------------------------------------------------
// Helpers

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// Where the test builds packages and unpacks roots (kept after a failure, for a look).
fn work_dir() -> PathBuf {
    vmbeam_tests::target_dir().join("packaging-test")
}

/// A finished command.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn of(what: &str, cmd: &mut Command) -> Out {
        let o = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    #[track_caller]
    fn ok(self, what: &str) -> Out {
        assert_eq!(
            self.code, 0,
            "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }
}

fn run(what: &str, program: &str, args: &[&str]) -> Out {
    Out::of(what, Command::new(program).args(args))
}

/// The built packages: `[revision 1, revision 2]` of each.
struct Packages {
    /// The upstream version (the workspace's, as `vmbeam --version` reports it).
    version: String,
    deb: [PathBuf; 2],
    dbgsym: PathBuf,
    rpm: [PathBuf; 2],
}

fn packages() -> &'static Packages {
    static P: OnceLock<Packages> = OnceLock::new();
    P.get_or_init(|| {
        let ws = workspace();
        run(
            "packaging/setup-deps.sh test",
            "bash",
            &[ws.join("packaging/setup-deps.sh").to_str().unwrap(), "test"],
        )
        .ok("installing the packaging tools");
        for b in ["vmbeamd", "vmbeam", "vmbeam-hook"] {
            assert!(
                vmbeam_tests::target_dir().join(b).is_file(),
                "target/release/{b} is not built: run scripts/test.sh (or scripts/build.sh) first"
            );
        }
        let version = run(
            "vmbeam --version",
            vmbeam_tests::vmbeam_bin().to_str().unwrap(),
            &["--version"],
        )
        .ok("vmbeam --version")
        .stdout
        .trim()
        .trim_start_matches("vmbeam ")
        .to_string();
        let build = |rev: u32| {
            let out = work_dir().join(format!("r{rev}"));
            let _ = std::fs::remove_dir_all(&out);
            let started = std::time::Instant::now();
            let mut cmd = Command::new(ws.join("scripts/package.sh"));
            if rev > 1 {
                // The upgrade needs no second set of debug symbols (saves about 20 s).
                cmd.env("DEB_BUILD_OPTIONS", "noautodbgsym");
            }
            Out::of(
                "scripts/package.sh",
                cmd.args([
                    "--bin-dir",
                    vmbeam_tests::target_dir().to_str().unwrap(),
                    "--release",
                    &rev.to_string(),
                    "--out",
                    out.to_str().unwrap(),
                ]),
            )
            .ok("scripts/package.sh");
            eprintln!(
                "packaging: release {rev} built in {:.0?}",
                started.elapsed()
            );
            out
        };
        let (r1, r2) = (build(1), build(2));
        let v = &version;
        let p = Packages {
            deb: [
                r1.join(format!("vmbeam_{v}-1_amd64.deb")),
                r2.join(format!("vmbeam_{v}-2_amd64.deb")),
            ],
            dbgsym: r1.join(format!("vmbeam-dbgsym_{v}-1_amd64.deb")),
            rpm: [
                r1.join(format!("vmbeam-{v}-1.x86_64.rpm")),
                r2.join(format!("vmbeam-{v}-2.x86_64.rpm")),
            ],
            version: version.clone(),
        };
        for f in p.deb.iter().chain(p.rpm.iter()).chain([&p.dbgsym]) {
            assert!(
                f.is_file(),
                "scripts/package.sh did not make {}",
                f.display()
            );
        }
        p
    })
}

/// The debootstrapped Debian root, as a cached tarball (made once, reused by later runs).
fn base_root_tarball() -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let tarball =
        Path::new(CACHE_DIR).join(format!("{SUITE}-{}.tar", ROOT_PACKAGES.replace(',', "+")));
    if tarball.is_file() {
        return tarball;
    }
    std::fs::create_dir_all(CACHE_DIR).expect("create the root cache directory");
    let tmp = Path::new(CACHE_DIR).join(format!("debootstrap.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let started = std::time::Instant::now();
    eprintln!(
        "packaging: debootstrap {SUITE} into {} (cached for later runs)",
        tmp.display()
    );
    run(
        "debootstrap",
        "debootstrap",
        &[
            "--variant=minbase",
            &format!("--include={ROOT_PACKAGES}"),
            SUITE,
            tmp.to_str().unwrap(),
            MIRROR,
        ],
    )
    .ok("debootstrap (is the Debian mirror reachable?)");
    let partial = tarball.with_extension("tar.part");
    run(
        "tar",
        "tar",
        &[
            "-C",
            tmp.to_str().unwrap(),
            "-cf",
            partial.to_str().unwrap(),
            ".",
        ],
    )
    .ok("tar the root");
    std::fs::rename(&partial, &tarball).expect("store the root tarball");
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!("packaging: root cached in {:.0?}", started.elapsed());
    tarball
}

/// A throwaway Debian root, removed when the test passes (kept for a look when it fails).
struct Root {
    dir: PathBuf,
}

impl Root {
    fn new(name: &str) -> Root {
        let tarball = base_root_tarball();
        let dir = work_dir().join("roots").join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).expect("remove an old root");
        }
        std::fs::create_dir_all(&dir).expect("create root");
        run(
            "tar",
            "tar",
            &[
                "-C",
                dir.to_str().unwrap(),
                "-xf",
                tarball.to_str().unwrap(),
            ],
        )
        .ok("unpack the root");
        Root { dir }
    }

    /// `path` (absolute, as seen inside) on the host.
    fn p(&self, path: &str) -> PathBuf {
        self.dir.join(path.trim_start_matches('/'))
    }

    fn read(&self, path: &str) -> String {
        std::fs::read_to_string(self.p(path))
            .unwrap_or_else(|e| panic!("read {path} in the root: {e}"))
    }

    fn write(&self, path: &str, content: &str, mode: u32) {
        let p = self.p(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn copy_in(&self, file: &Path) -> String {
        let name = file.file_name().unwrap().to_str().unwrap();
        std::fs::copy(file, self.p("/tmp").join(name)).expect("copy a package into the root");
        format!("/tmp/{name}")
    }

    /// The namespaces every command runs in (see the module docs), then `inner`.
    fn unshare(&self, inner: &str, arg: &str) -> Command {
        let mut c = Command::new("unshare");
        c.env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("LC_ALL", "C")
            .env("HOME", "/root")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args([
                "--mount",
                "--uts",
                "--pid",
                "--fork",
                "--kill-child",
                &format!("--mount-proc={}", self.p("/proc").display()),
                "sh",
                "-c",
                &format!("hostname {HOST_NAME} && {inner}"),
                arg,
            ]);
        c
    }

    /// Runs a shell script inside the root.
    fn sh(&self, script: &str) -> Out {
        let inner = format!("exec chroot '{}' /bin/sh -c \"$0\"", self.dir.display());
        Out::of(
            &format!("in the root: {script}"),
            &mut self.unshare(&inner, script),
        )
    }

    #[track_caller]
    fn sh_ok(&self, script: &str) -> Out {
        self.sh(script).ok(script)
    }

    /// Runs a host command (e.g. `rpm --root`) in the same namespaces.
    fn host(&self, script: &str) -> Out {
        Out::of(
            &format!("on the host: {script}"),
            &mut self.unshare("exec sh -c \"$0\"", script),
        )
    }

    /// Every path in the root that a package could leave behind (not the package managers'
    /// own databases and logs, nor the test's stand-ins).
    fn snapshot(&self) -> BTreeSet<String> {
        const SKIP: &[&str] = &[
            "/proc",
            "/dev",
            "/sys",
            "/tmp",
            "/var/log",
            "/var/cache",
            "/var/lib/dpkg",
            "/var/lib/rpm",
            "/usr/lib/sysimage/rpm",
            "/usr/local/sbin",
            "/run/systemd",
            "/run/libvirtd.pid",
            "/run/libvirtd.hups",
            "/root/.rpmdb",
        ];
        fn walk(root: &Path, rel: &str, out: &mut BTreeSet<String>) {
            let Ok(entries) = std::fs::read_dir(root.join(rel.trim_start_matches('/'))) else {
                return;
            };
            for e in entries.flatten() {
                let path = format!("{rel}/{}", e.file_name().to_string_lossy());
                if SKIP.contains(&path.as_str()) {
                    continue;
                }
                let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
                out.insert(path.clone());
                if is_dir {
                    walk(root, &path, out);
                }
            }
        }
        let mut out = BTreeSet::new();
        walk(&self.dir, "", &mut out);
        out
    }

    fn fake_systemd(&self, running: bool) {
        self.write("/usr/local/sbin/systemctl", FAKE_SYSTEMCTL, 0o755);
        let flag = self.p("/run/systemd/system");
        if running {
            std::fs::create_dir_all(&flag).unwrap();
        } else {
            let _ = std::fs::remove_dir_all(self.p("/run/systemd"));
        }
        let _ = std::fs::remove_file(self.p("/var/log/fake-systemctl.log"));
    }

    fn systemctl_log(&self) -> String {
        std::fs::read_to_string(self.p("/var/log/fake-systemctl.log")).unwrap_or_default()
    }

    /// The systemctl calls that talk to a running systemd (not `--root=` ones, which only
    /// edit unit symlinks, as deb-systemd-helper does wherever systemctl is installed).
    fn live_systemctl_calls(&self) -> String {
        self.systemctl_log()
            .lines()
            .filter(|l| !l.contains("--root="))
            .map(|l| format!("{l}\n"))
            .collect()
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("packaging: root kept for a look: {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Checks a package's list of non-directory files against `expected`; extra man pages of
/// subcommands (`vmbeam-*.1.gz`) are fine, anything else extra or missing is not. Nothing of
/// the lab (`vmbeam-lab`, not a product) and no libxl hook (no Xen backend yet) is shipped.
#[track_caller]
fn assert_file_list(listed: &BTreeSet<String>, expected: &[&str], what: &str) {
    let not_shipped: Vec<_> = listed
        .iter()
        .filter(|f| f.contains("vmbeam-lab") || f.contains("libxl"))
        .collect();
    assert!(not_shipped.is_empty(), "{what}: ships {not_shipped:?}");
    let expected: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
    let missing: Vec<_> = expected.difference(listed).collect();
    let extra: Vec<_> = listed
        .difference(&expected)
        .filter(|f| !(f.starts_with("/usr/share/man/man1/vmbeam-") && f.ends_with(".1.gz")))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: missing {missing:?}, unexpected {extra:?}"
    );
}

/// Checks the installed files in `root`: modes, owners, the hook links, the unit and the
/// D-Bus activation file agreeing with it.
#[track_caller]
fn check_installed_files(root: &Root, files: &[&str], unit: &str) {
    for f in files.iter().chain(STATE_DIRS) {
        let p = root.p(f);
        let meta = std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(
            (meta.uid(), meta.gid()),
            (0, 0),
            "{f} must belong to root:root"
        );
        let want = if f.starts_with("/etc/libvirt/hooks/") {
            let link = std::fs::read_link(&p).unwrap_or_else(|e| panic!("{f}: not a symlink: {e}"));
            let resolved = p.parent().unwrap().join(&link);
            let target = if link.is_absolute() {
                root.p(link.to_str().unwrap())
            } else {
                resolved
            };
            assert_eq!(
                std::fs::canonicalize(&target).unwrap(),
                std::fs::canonicalize(root.p(HOOK)).unwrap(),
                "{f} must lead to {HOOK}"
            );
            continue;
        } else if meta.is_dir()
            || f.ends_with("/vmbeamd")
            || f.ends_with("/bin/vmbeam")
            || f.ends_with("-hook")
        {
            0o755
        } else {
            0o644
        };
        assert_eq!(mode(&p), want, "mode of {f}");
    }
    let unit_text = root.read(unit);
    for line in [
        "Type=dbus",
        "BusName=org.vmbeam.VMBeam1",
        "ExecStart=/usr/sbin/vmbeamd --config /etc/vmbeam/vmbeam.conf",
        "WantedBy=multi-user.target",
    ] {
        assert!(
            unit_text.lines().any(|l| l == line),
            "{unit} lacks {line}:\n{unit_text}"
        );
    }
    let activation = root.read("/usr/share/dbus-1/system-services/org.vmbeam.VMBeam1.service");
    for line in [
        "Name=org.vmbeam.VMBeam1",
        "SystemdService=vmbeamd.service",
        "User=root",
        "Exec=/usr/sbin/vmbeamd --config /etc/vmbeam/vmbeam.conf",
    ] {
        assert!(
            activation.lines().any(|l| l == line),
            "activation file lacks {line}"
        );
    }
    // systemd's own check of the unit, against this root (ExecStart must exist there).
    let verify = run(
        "systemd-analyze verify",
        "systemd-analyze",
        &[
            "verify",
            "--man=no",
            &format!("--root={}", root.dir.display()),
            "vmbeamd.service",
        ],
    )
    .ok("systemd-analyze verify vmbeamd.service");
    assert!(
        verify.stderr.trim().is_empty(),
        "systemd-analyze verify: {}",
        verify.stderr
    );
}

/// The configuration after the first installation: the shipped file with the host name as
/// host_id, parsed by VMBeam's own parser; the generated key 0600, root's, loadable.
#[track_caller]
fn check_config_and_key(root: &Root, host_id: &str) -> String {
    let conf = root.read("/etc/vmbeam/vmbeam.conf");
    let mut identity: vmbeam_core::Identity = conf
        .parse()
        .unwrap_or_else(|e| panic!("installed vmbeam.conf does not parse: {e}\n{conf}"));
    assert_eq!(identity.host_id.as_str(), host_id);
    assert_eq!(identity.key_file, Path::new("/etc/vmbeam/cloud.key"));
    let key = root.p("/etc/vmbeam/cloud.key");
    let meta = std::fs::metadata(&key).expect("postinst generates /etc/vmbeam/cloud.key");
    assert_eq!(
        (mode(&key), meta.uid(), meta.gid()),
        (0o600, 0, 0),
        "cloud.key must be 0600 root:root"
    );
    identity.key_file = key.clone();
    identity.load_key().expect("the generated key loads");
    let text = std::fs::read_to_string(&key).unwrap();
    assert!(
        text.trim().len() == 64 && text.trim().bytes().all(|b| b.is_ascii_hexdigit()),
        "key should be 32 random bytes in hex: {text:?}"
    );
    text
}

/// The hook as libvirt runs it: domains without VMBeam metadata pass through untouched
/// (no daemon needed); a beam-enabled one with no daemon fails with one clear line.
#[track_caller]
fn check_hook(root: &Root) {
    root.write("/tmp/plain.xml", PLAIN_XML, 0o644);
    root.write("/tmp/beam.xml", &beam_xml(), 0o644);
    let hook = "/etc/libvirt/hooks/qemu.d/vmbeam";
    let out = root.sh_ok(&format!("{hook} guest1 migrate begin - </tmp/plain.xml"));
    assert_eq!(
        out.stdout, PLAIN_XML,
        "{hook} migrate must print the XML unchanged"
    );
    let out = root.sh_ok(&format!("{hook} guest1 prepare begin - </tmp/plain.xml"));
    assert_eq!(out.stdout, "", "{hook} prints nothing for other operations");
    let out = root.sh(&format!("{hook} guest1 migrate begin - </tmp/beam.xml"));
    assert_ne!(
        out.code, 0,
        "{hook} migrate on a beam-enabled domain without vmbeamd must fail"
    );
    let err = out.stderr.trim();
    assert_eq!(err.lines().count(), 1, "one line on stderr, got: {err}");
    assert!(
        err.starts_with("vmbeam-hook: ") && err.contains("vmbeamd"),
        "unclear: {err}"
    );
    assert_eq!(out.stdout, "", "nothing on stdout when failing");
}

/// The .deb's libvirt0 dependency (dpkg-shlibdeps' lower bound, from Debian's symbols file:
/// the libvirt release that introduced each symbol the binaries call) must accept both
/// libvirt stacks VMBeam supports, whichever one the binaries were linked against: Debian
/// 12's libvirt0 9.0 (read from the test's root) and bookworm-backports' 11.3 (as
/// scripts/setup.sh installs it; also the host's own libvirt0, if installed).
#[track_caller]
fn check_libvirt0_dependency(depends: &str) {
    let relation = depends
        .split(',')
        .map(str::trim)
        .find(|d| d.split_whitespace().next() == Some("libvirt0"))
        .unwrap_or_else(|| panic!("Depends lacks libvirt0: {depends}"));
    let bound = relation
        .strip_prefix("libvirt0 (>= ")
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("libvirt0 should have a lower bound only: {relation}"));
    let status = run(
        "tar -xO status",
        "tar",
        &[
            "-xOf",
            base_root_tarball().to_str().unwrap(),
            "./var/lib/dpkg/status",
        ],
    )
    .ok("read the Debian 12 root's dpkg status")
    .stdout;
    let debian12 = status
        .split("\n\n")
        .find(|stanza| stanza.lines().any(|l| l == "Package: libvirt0"))
        .and_then(|stanza| stanza.lines().find_map(|l| l.strip_prefix("Version: ")))
        .expect("libvirt0 in the Debian 12 root")
        .to_string();
    assert!(
        debian12.starts_with("9.0.0-"),
        "the test root should have Debian 12's libvirt0 9.0, not {debian12}"
    );
    let mut versions = vec![
        ("Debian 12", debian12),
        ("bookworm-backports", BACKPORTS_LIBVIRT0.to_string()),
    ];
    let host = run(
        "dpkg-query",
        "dpkg-query",
        &["-W", "-f=${Version}", "libvirt0"],
    );
    if host.code == 0 && !host.stdout.trim().is_empty() {
        versions.push(("this host", host.stdout.trim().to_string()));
    }
    for (which, version) in versions {
        let ok = run(
            "dpkg --compare-versions",
            "dpkg",
            &["--compare-versions", &version, "ge", bound],
        );
        assert_eq!(
            ok.code, 0,
            "{relation} rejects {which}'s libvirt0 {version}: VMBeam supports it"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Tests

#[test]
fn deb_passes_lintian_with_only_listed_warnings() {
    let p = packages();
    let allowed_text = std::fs::read_to_string(workspace().join("packaging/lintian-warnings.txt"))
        .expect("packaging/lintian-warnings.txt");
    let mut allowed = BTreeSet::new();
    for line in allowed_text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (tag, reason) = line.split_once(':').unwrap_or((line, ""));
        assert!(
            reason.trim().len() > 10,
            "lintian-warnings.txt: give a reason for {tag}"
        );
        allowed.insert(tag.trim().to_string());
    }
    let out = run(
        "lintian",
        "lintian",
        &[
            "--fail-on",
            "error",
            "--no-tag-display-limit",
            p.deb[0].to_str().unwrap(),
            p.dbgsym.to_str().unwrap(),
        ],
    );
    let mut errors = Vec::new();
    let mut unlisted = Vec::new();
    let mut seen = BTreeSet::new();
    for line in out.stdout.lines() {
        // "E: vmbeam: tag-name extra..." / "W: vmbeam-dbgsym: tag ..."
        let mut parts = line.splitn(3, ": ");
        let (Some(sev), Some(_pkg), Some(rest)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let tag = rest
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        match sev {
            "E" => errors.push(line.to_string()),
            "W" if !allowed.contains(&tag) => unlisted.push(line.to_string()),
            "W" => {
                seen.insert(tag);
            }
            _ => {}
        }
    }
    assert!(errors.is_empty(), "lintian errors:\n{}", errors.join("\n"));
    assert!(
        unlisted.is_empty(),
        "lintian warnings not in packaging/lintian-warnings.txt (fix them, or list them with a reason):\n{}",
        unlisted.join("\n")
    );
    assert_eq!(out.code, 0, "lintian failed: {}{}", out.stdout, out.stderr);
    for stale in allowed.difference(&seen) {
        eprintln!("packaging: lintian-warnings.txt lists {stale}, which lintian no longer reports");
    }

    // Dependencies as the issue asks: the libraries (libvirt0 found by dpkg-shlibdeps), a
    // system bus; QEMU and libvirtd recommended.
    let field = |f: &str| {
        run(
            "dpkg-deb -f",
            "dpkg-deb",
            &["-f", p.deb[0].to_str().unwrap(), f],
        )
        .ok("dpkg-deb -f")
        .stdout
    };
    let depends = field("Depends");
    for d in [
        "libvirt0",
        "libc6",
        "default-dbus-system-bus | dbus-system-bus",
    ] {
        assert!(depends.contains(d), "Depends lacks {d}: {depends}");
    }
    check_libvirt0_dependency(&depends);
    let recommends = field("Recommends");
    for r in ["libvirt-daemon", "qemu-system-x86", "polkitd"] {
        assert!(recommends.contains(r), "Recommends lacks {r}: {recommends}");
    }
}

#[test]
fn rpm_passes_rpmlint_and_carries_its_files_and_scriptlets() {
    let p = packages();
    let rpm = p.rpm[0].to_str().unwrap();
    let lint = run(
        "rpmlint",
        "rpmlint",
        &[
            "-c",
            workspace()
                .join("packaging/rpm/rpmlint.toml")
                .to_str()
                .unwrap(),
            rpm,
        ],
    );
    let complaints: Vec<_> = lint
        .stdout
        .lines()
        .filter(|l| l.contains(": E: ") || l.contains(": W: "))
        .collect();
    assert!(
        lint.code == 0 && complaints.is_empty(),
        "rpmlint (fix, or filter in packaging/rpm/rpmlint.toml with a reason):\n{}\n{}",
        lint.stdout,
        lint.stderr
    );

    let q = |args: &[&str]| {
        let mut a = vec!["-qp"];
        a.extend_from_slice(args);
        a.push(rpm);
        run("rpm -qp", "rpm", &a).ok("rpm -qp").stdout
    };
    // Files with their modes and owners; directories apart.
    let mut files = BTreeSet::new();
    let mut dirs = BTreeSet::new();
    for line in q(&[
        "--qf",
        "[%{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILENAMES} %{FILELINKTOS}\n]",
    ])
    .lines()
    {
        let v: Vec<&str> = line.split_whitespace().collect();
        let (perms, owner, name) = (v[0], v[1], v[2].to_string());
        assert_eq!(owner, "root:root", "{name}");
        if perms.starts_with('d') {
            assert_eq!(perms, "drwxr-xr-x", "{name}");
            dirs.insert(name);
            continue;
        }
        let want = if name.starts_with("/etc/libvirt/hooks/") {
            assert_eq!(
                v.get(3).copied(),
                Some("../../../../usr/libexec/vmbeam/vmbeam-hook"),
                "{name}"
            );
            "lrwxrwxrwx"
        } else if ["/usr/sbin/vmbeamd", "/usr/bin/vmbeam", HOOK].contains(&name.as_str()) {
            "-rwxr-xr-x"
        } else {
            "-rw-r--r--"
        };
        assert_eq!(perms, want, "{name}");
        files.insert(name);
    }
    assert_file_list(&files, RPM_FILES, "rpm -qlp");
    for d in STATE_DIRS.iter().chain(&[
        "/etc/vmbeam",
        "/usr/libexec/vmbeam",
        "/etc/libvirt/hooks",
        "/etc/libvirt/hooks/qemu.d",
    ]) {
        assert!(dirs.contains(*d), "the rpm should own {d}");
    }
    assert_eq!(q(&["--configfiles"]).trim(), "/etc/vmbeam/vmbeam.conf");
    assert!(
        !files.contains("/etc/vmbeam/cloud.key"),
        "the key is generated, never shipped"
    );

    let requires = q(&["--requires"]);
    for r in ["dbus", "libvirt.so.0()(64bit)", "/bin/sh"] {
        assert!(
            requires.lines().any(|l| l.trim() == r),
            "Requires lacks {r}:\n{requires}"
        );
    }
    let recommends = q(&["--recommends"]);
    for r in ["libvirt-daemon", "qemu-system-x86", "polkit"] {
        assert!(
            recommends.lines().any(|l| l.trim() == r),
            "Recommends lacks {r}:\n{recommends}"
        );
    }

    // Scriptlets: systemd only where it runs, guarded; config and key on install; restart on
    // upgrade; disable and stop on erase; nothing can fail the transaction.
    let scripts = q(&["--scripts"]);
    let mut sections = std::collections::BTreeMap::new();
    let mut current = None;
    for line in scripts.lines() {
        if let Some(name) = line.strip_suffix(" scriptlet (using /bin/sh):") {
            current = Some(name.to_string());
            sections.insert(name.to_string(), String::new());
        } else if let Some(name) = &current {
            let s = sections.get_mut(name).unwrap();
            s.push_str(line);
            s.push('\n');
        }
    }
    let section = |name: &str| -> String {
        sections
            .get(name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} scriptlet:\n{scripts}"))
    };
    let post = section("postinstall");
    for s in [
        "vmbeam_configure",
        "vmbeam_reload_libvirt",
        "preset vmbeamd.service",
        "[ -d /run/systemd/system ]",
        "start vmbeamd.service",
        "exit 0",
    ] {
        assert!(post.contains(s), "%post lacks {s}:\n{post}");
    }
    let preun = section("preuninstall");
    for s in [
        "disable --now vmbeamd.service",
        "vmbeam_stop_without_systemd",
        "[ \"$1\" -eq 0 ]",
    ] {
        assert!(preun.contains(s), "%preun lacks {s}:\n{preun}");
    }
    let postun = section("postuninstall");
    for s in ["try-restart vmbeamd.service", "[ \"$1\" -ge 1 ]"] {
        assert!(postun.contains(s), "%postun lacks {s}:\n{postun}");
    }
    for (name, text) in [("%post", &post), ("%preun", &preun), ("%postun", &postun)] {
        for line in text
            .lines()
            .filter(|l| l.trim_start().starts_with("systemctl"))
        {
            assert!(
                line.contains("||"),
                "{name}: a systemctl call that can fail the transaction: {line}"
            );
        }
    }
}

#[test]
fn deb_installs_upgrades_removes_and_purges_cleanly() {
    let p = packages();
    let root = Root::new("deb-lifecycle");
    let deb1 = root.copy_in(&p.deb[0]);
    let deb2 = root.copy_in(&p.deb[1]);
    root.fake_systemd(false);
    root.write("/usr/local/sbin/libvirtd", FAKE_LIBVIRTD, 0o755);
    let before = root.snapshot();

    // 1. First installation, no systemd running, a libvirtd running: it gets one SIGHUP.
    let out = root.sh_ok(&format!(
        "{{ {START_FAKE_LIBVIRTD}; }} && dpkg -i {deb1} && {{ {AWAIT_FAKE_LIBVIRTD_HUP}; }}"
    ));
    let said = format!("{}{}", out.stdout, out.stderr);
    assert!(
        said.contains(&format!("host_id set to \"{HOST_NAME}\"")),
        "{said}"
    );
    assert!(
        said.contains("Every cloud VM of one virtual IaaS cloud needs the same key"),
        "{said}"
    );
    assert_eq!(
        root.live_systemctl_calls(),
        "",
        "no systemctl calls where systemd does not run"
    );
    assert_eq!(
        std::fs::read_to_string(root.p("/run/libvirtd.hups")).unwrap_or_default(),
        "hup\n",
        "postinst must make a running libvirtd re-read its hooks (one SIGHUP):\n{said}"
    );
    let listed: BTreeSet<String> = root
        .sh_ok("dpkg -L vmbeam")
        .stdout
        .lines()
        .filter(|f| !root.p(f).is_dir())
        .map(str::to_string)
        .collect();
    assert_file_list(&listed, DEB_FILES, "dpkg -L vmbeam");
    let installed: BTreeSet<String> = root
        .sh_ok("dpkg -L vmbeam")
        .stdout
        .lines()
        .map(str::to_string)
        .collect();
    for d in STATE_DIRS {
        assert!(installed.contains(*d), "the package should own {d}");
    }
    assert_eq!(
        root.sh_ok("dpkg-query -W -f='${Conffiles}' vmbeam")
            .stdout
            .split_whitespace()
            .next(),
        Some("/etc/vmbeam/vmbeam.conf"),
        "vmbeam.conf must be the (only) conffile"
    );
    check_installed_files(&root, DEB_FILES, "/lib/systemd/system/vmbeamd.service");
    let key = check_config_and_key(&root, HOST_NAME);
    assert!(
        root.p("/etc/systemd/system/multi-user.target.wants/vmbeamd.service")
            .is_symlink(),
        "vmbeamd.service must be enabled"
    );
    for (bin, name) in [("vmbeam", "vmbeam"), ("/usr/sbin/vmbeamd", "vmbeamd")] {
        let out = root.sh_ok(&format!("{bin} --version"));
        assert_eq!(
            out.stdout.trim(),
            format!("{name} {}", p.version),
            "{bin} runs with the libraries the package depends on"
        );
    }
    root.sh_ok(
        "bash -n /usr/share/bash-completion/completions/vmbeam && zcat /usr/share/man/man1/vmbeam.1.gz | grep -q '^.TH vmbeam 1'",
    );
    check_hook(&root);

    // 2. Upgrade to a rebuilt package (VERSION-2), systemd running, vmbeam.conf edited.
    let conf = root
        .read("/etc/vmbeam/vmbeam.conf")
        .replace("cloud = \"default\"", "cloud = \"acme-edited\"");
    root.write("/etc/vmbeam/vmbeam.conf", &conf, 0o644);
    root.fake_systemd(true);
    root.sh_ok(&format!("dpkg -i {deb2}"));
    assert_eq!(
        root.sh_ok("dpkg-query -W -f='${Version}' vmbeam").stdout,
        format!("{}-2", p.version)
    );
    assert_eq!(
        root.read("/etc/vmbeam/vmbeam.conf"),
        conf,
        "the edited conffile is kept"
    );
    assert_eq!(
        root.read("/etc/vmbeam/cloud.key"),
        key,
        "the key is never replaced"
    );
    assert!(
        !root.p("/etc/vmbeam/vmbeam.conf.dpkg-dist").exists()
            && !root.p("/etc/vmbeam/vmbeam.conf.dpkg-new").exists()
    );
    let log = root.systemctl_log();
    for call in [
        "--system daemon-reload",
        "reload libvirtd.service",
        "restart vmbeamd.service",
    ] {
        assert!(
            log.contains(call),
            "upgrade with systemd running should run systemctl {call}; log:\n{log}"
        );
    }
    assert!(
        !log.contains("reload virtqemud.service"),
        "only running daemons are reloaded:\n{log}"
    );
    check_installed_files(&root, DEB_FILES, "/lib/systemd/system/vmbeamd.service");

    // 3. Remove without systemd: a vmbeamd started by D-Bus activation is stopped (matched by
    // executable: a same-named program elsewhere is left alone); configuration stays.
    root.fake_systemd(false);
    let out = root.sh_ok(
        "cp /bin/sleep /usr/sbin/vmbeamd; cp /bin/sleep /tmp/vmbeamd; \
         /usr/sbin/vmbeamd 300 & /tmp/vmbeamd 300 & sleep 0.3; \
         dpkg -r vmbeam; rc=$?; sleep 0.2; \
         for p in /proc/[0-9]*; do [ \"$(readlink $p/exe)\" = /tmp/vmbeamd ] && echo other-alive; \
           case \"$(readlink $p/exe)\" in /usr/sbin/vmbeamd*) echo daemon-alive;; esac; done; exit $rc",
    );
    assert!(
        !out.stdout.contains("daemon-alive"),
        "prerm must stop vmbeamd without systemd"
    );
    assert!(
        out.stdout.contains("other-alive"),
        "prerm must not stop other processes named vmbeamd"
    );
    assert_eq!(
        root.live_systemctl_calls(),
        "",
        "remove without systemd calls no systemctl"
    );
    for f in DEB_FILES.iter().filter(|f| !f.starts_with("/etc/vmbeam/")) {
        assert!(
            !root.p(f).exists() && !root.p(f).is_symlink(),
            "{f} must go on remove"
        );
    }
    assert_eq!(
        root.read("/etc/vmbeam/vmbeam.conf"),
        conf,
        "remove keeps the configuration"
    );
    assert_eq!(
        root.read("/etc/vmbeam/cloud.key"),
        key,
        "remove keeps the key"
    );

    // 4. Reinstall with systemd running: enabled and (re)started; configuration as it was.
    root.fake_systemd(true);
    let out = root.sh_ok(&format!("dpkg -i {deb2}"));
    assert!(
        !out.stdout.contains("generated a new cloud key"),
        "{}",
        out.stdout
    );
    let log = root.systemctl_log();
    assert!(
        log.contains("start vmbeamd.service"),
        "reinstall should (re)start vmbeamd; log:\n{log}"
    );
    assert_eq!(root.read("/etc/vmbeam/vmbeam.conf"), conf);
    assert_eq!(root.read("/etc/vmbeam/cloud.key"), key);

    // 5. Purge with systemd running, guest memory in the pool: vmbeamd stopped, everything
    // gone but the pool's contents.
    root.fake_systemd(true);
    root.write(
        "/var/lib/vmbeam/pool/6e3b1e9a-1b2c-4d5e-8f90-0123456789ab.1.ram",
        "guest memory",
        0o600,
    );
    let out = root.sh_ok("dpkg --purge vmbeam");
    assert!(
        out.stderr.contains("keeping /var/lib/vmbeam/pool"),
        "{}",
        out.stderr
    );
    let log = root.systemctl_log();
    assert!(
        log.contains("stop vmbeamd.service"),
        "purge should stop vmbeamd; log:\n{log}"
    );
    assert!(
        root.sh("dpkg -s vmbeam").code != 0,
        "vmbeam must be gone from dpkg's database"
    );
    let left: Vec<_> = root.snapshot().difference(&before).cloned().collect();
    assert_eq!(
        left,
        [
            "/var/lib/vmbeam",
            "/var/lib/vmbeam/pool",
            "/var/lib/vmbeam/pool/6e3b1e9a-1b2c-4d5e-8f90-0123456789ab.1.ram"
        ],
        "purge must leave only the pool's contents"
    );
    let gone: Vec<_> = before.difference(&root.snapshot()).cloned().collect();
    assert!(
        gone.is_empty(),
        "the package removed files it did not own: {gone:?}"
    );
}

#[test]
fn deb_first_install_with_systemd_then_dbus_policy_and_polkit_actions_are_enforced() {
    let p = packages();
    let root = Root::new("deb-dbus");
    let deb = root.copy_in(&p.deb[0]);
    // First installation where systemd runs: enabled, started, a running libvirtd reloaded.
    root.fake_systemd(true);
    root.sh_ok(&format!("dpkg -i {deb}"));
    let log = root.live_systemctl_calls();
    let words = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    for call in [
        &["daemon-reload"][..],
        &["start", "vmbeamd.service"],
        &["is-active", "libvirtd.service"],
        &["reload", "libvirtd.service"],
    ] {
        assert!(
            log.lines()
                .any(|l| call.iter().all(|w| words(l).contains(&w.to_string()))),
            "first installation with systemd running should run systemctl {call:?}; log:\n{log}"
        );
    }
    assert!(
        root.p("/etc/systemd/system/multi-user.target.wants/vmbeamd.service")
            .is_symlink(),
        "vmbeamd.service must be enabled"
    );
    root.fake_systemd(false);
    // A real system bus with the installed policy; dbus-test-tool answers every call made to
    // org.vmbeam.VMBeam1 with an empty reply, so what fails is what the policy refuses.
    let script = r#"
mkdir -p /run/dbus && dbus-daemon --system --fork || exit 1
/usr/lib/polkit-1/polkitd --no-debug >/dev/null 2>&1 &
nobody() { setpriv --reuid=nobody --regid=nogroup --clear-groups "$@"; }
case_() { name=$1; shift; out=$("$@" 2>&1); echo "CASE $name rc=$? $(echo "$out" | head -1)"; }
case_ own-as-nobody nobody timeout 5 dbus-test-tool echo --system --name=org.vmbeam.VMBeam1
dbus-test-tool echo --system --name=org.vmbeam.VMBeam1 & sleep 0.5
call() { who=$1; shift; case_ "$who:$1" $([ "$who" = nobody ] && echo nobody) dbus-send --system --print-reply --dest=org.vmbeam.VMBeam1 "$2" "$1" $3; }
for m in org.vmbeam.VMBeam1.Manager.ListDomains org.vmbeam.VMBeam1.Manager.Status org.vmbeam.VMBeam1.Manager.CoLocation \
         org.freedesktop.DBus.Introspectable.Introspect org.freedesktop.DBus.Peer.Ping \
         org.freedesktop.DBus.Properties.GetAll org.freedesktop.DBus.Properties.Get \
         org.freedesktop.DBus.Properties.Set \
         org.vmbeam.VMBeam1.Manager.Migrate org.vmbeam.VMBeam1.Manager.Enable org.vmbeam.VMBeam1.Manager.Disable \
         org.vmbeam.VMBeam1.Hook.HookEvent; do
  call nobody $m /org/vmbeam/VMBeam1
  call root $m /org/vmbeam/VMBeam1
done
call nobody org.vmbeam.VMBeam1.Job.Cancel /org/vmbeam/VMBeam1/jobs/1
call root org.vmbeam.VMBeam1.Job.Cancel /org/vmbeam/VMBeam1/jobs/1
for a in org.vmbeam.VMBeam1.migrate org.vmbeam.VMBeam1.enable; do
  echo "ACTION $a $(pkaction --verbose --action-id $a 2>&1 | grep -c 'implicit [a-z]*: *auth_admin_keep')"
done
"#;
    let out = root.sh_ok(script);
    let result = |name: &str| -> (bool, String) {
        let line = out
            .stdout
            .lines()
            .find(|l| l.starts_with(&format!("CASE {name} ")))
            .unwrap_or_else(|| panic!("no result for {name}:\n{}\n{}", out.stdout, out.stderr));
        (line.contains(" rc=0 "), line.to_string())
    };
    let (ok, line) = result("own-as-nobody");
    assert!(
        !ok && line.contains("failed to take bus name"),
        "only root may own org.vmbeam.VMBeam1: {line}"
    );
    let read_only = [
        "org.vmbeam.VMBeam1.Manager.ListDomains",
        "org.vmbeam.VMBeam1.Manager.Status",
        "org.vmbeam.VMBeam1.Manager.CoLocation",
        "org.freedesktop.DBus.Introspectable.Introspect",
        "org.freedesktop.DBus.Peer.Ping",
        "org.freedesktop.DBus.Properties.GetAll",
        "org.freedesktop.DBus.Properties.Get",
        // vmbeamd authorizes these through polkit: the bus lets them through.
        "org.vmbeam.VMBeam1.Manager.Migrate",
        "org.vmbeam.VMBeam1.Manager.Enable",
        "org.vmbeam.VMBeam1.Manager.Disable",
        "org.vmbeam.VMBeam1.Job.Cancel",
    ];
    let privileged = [
        "org.freedesktop.DBus.Properties.Set",
        "org.vmbeam.VMBeam1.Hook.HookEvent",
    ];
    for m in read_only {
        let (ok, line) = result(&format!("nobody:{m}"));
        assert!(ok, "an unprivileged caller may call {m}: {line}");
    }
    for m in privileged {
        let (ok, line) = result(&format!("nobody:{m}"));
        assert!(
            !ok && line.contains("AccessDenied"),
            "an unprivileged caller must be refused {m}: {line}"
        );
    }
    for m in read_only
        .iter()
        .chain(&privileged)
        .filter(|m| !m.ends_with("Job.Cancel"))
    {
        let (ok, line) = result(&format!("root:{m}"));
        assert!(ok, "root may call {m}: {line}");
    }
    let (ok, line) = result("root:org.vmbeam.VMBeam1.Job.Cancel");
    assert!(ok, "root may cancel jobs: {line}");
    for a in ["org.vmbeam.VMBeam1.migrate", "org.vmbeam.VMBeam1.enable"] {
        assert!(
            out.stdout.contains(&format!("ACTION {a} 3")),
            "polkitd must load {a} with auth_admin_keep for any, inactive and active sessions:\n{}\n{}",
            out.stdout,
            out.stderr
        );
    }
}

#[test]
fn rpm_installs_upgrades_and_erases_in_an_rpm_root() {
    let p = packages();
    let root = Root::new("rpm-lifecycle");
    let before = root.snapshot();
    let r = root.dir.display().to_string();
    let (rpm1, rpm2) = (
        p.rpm[0].display().to_string(),
        p.rpm[1].display().to_string(),
    );
    root.fake_systemd(false);

    // Install (scriptlets run in the root: no systemd there).
    root.host(&format!("rpm --root {r} --initdb"))
        .ok("rpm --initdb");
    let out = root
        .host(&format!("rpm --root {r} --nodeps -i {rpm1}"))
        .ok("rpm -i");
    assert!(
        out.stdout.contains("generated a new cloud key"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    let q = |args: &str| root.host(&format!("rpm --root {r} {args}")).ok(args).stdout;
    assert_eq!(
        q("-q --qf %{VERSION}-%{RELEASE} vmbeam"),
        format!("{}-1", p.version)
    );
    let files: BTreeSet<String> = q("-ql vmbeam")
        .lines()
        .filter(|f| !root.p(f).is_dir())
        .map(str::to_string)
        .collect();
    assert_file_list(&files, RPM_FILES, "rpm -ql vmbeam");
    check_installed_files(&root, RPM_FILES, "/usr/lib/systemd/system/vmbeamd.service");
    let key = check_config_and_key(&root, HOST_NAME);
    assert_eq!(
        root.live_systemctl_calls(),
        "",
        "no systemctl calls where systemd does not run"
    );
    check_hook(&root);

    // Upgrade to release 2 with an edited configuration: kept, no .rpmnew; key kept.
    let conf = root
        .read("/etc/vmbeam/vmbeam.conf")
        .replace("cloud = \"default\"", "cloud = \"acme-edited\"");
    root.write("/etc/vmbeam/vmbeam.conf", &conf, 0o644);
    root.host(&format!("rpm --root {r} --nodeps -U {rpm2}"))
        .ok("rpm -U");
    assert_eq!(
        q("-q --qf %{VERSION}-%{RELEASE} vmbeam"),
        format!("{}-2", p.version)
    );
    assert_eq!(root.read("/etc/vmbeam/vmbeam.conf"), conf);
    assert!(!root.p("/etc/vmbeam/vmbeam.conf.rpmnew").exists());
    assert_eq!(root.read("/etc/vmbeam/cloud.key"), key);

    // Erase: programs go; the edited configuration is saved (.rpmsave) and the key stays,
    // RPM's way of keeping a cloud VM's identity (there is no purge).
    root.host(&format!("rpm --root {r} --nodeps -e vmbeam"))
        .ok("rpm -e");
    assert_eq!(root.read("/etc/vmbeam/vmbeam.conf.rpmsave"), conf);
    assert_eq!(root.read("/etc/vmbeam/cloud.key"), key);
    // Not counted: /etc/libvirt and /usr/share/licenses, parents that rpm made here but that
    // on an RPM distribution belong to packages vmbeam requires (libvirt-libs, which provides
    // libvirt.so.0, and filesystem).
    let left: Vec<_> = root
        .snapshot()
        .difference(&before)
        .filter(|p| *p != "/etc/libvirt" && *p != "/usr/share/licenses")
        .cloned()
        .collect();
    assert_eq!(
        left,
        [
            "/etc/vmbeam",
            "/etc/vmbeam/cloud.key",
            "/etc/vmbeam/vmbeam.conf.rpmsave"
        ],
        "rpm -e must leave only the configuration"
    );
}
