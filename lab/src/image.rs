//! The lab guest image: Debian's cloud kernel and a busybox initramfs whose /init starts
//! the VMBeam guest agent.
//!
//! Nothing is installed on the host: the kernel (the package `linux-image-cloud-amd64`
//! depends on) and `busybox-static` are fetched with `apt-get download` into the cache and
//! unpacked there with `dpkg -x`. The initramfs is an uncompressed newc cpio archive
//! written here in Rust (no `cpio` program needed), byte-for-byte reproducible (fixed
//! owners and times, sorted entries), so the same inputs give the same image id.
//!
//! Cache layout under [`ImageSpec::cache_dir`]:
//! - `debs/`: the downloaded `.deb` files;
//! - `pkgs/<deb name>/`: each unpacked;
//! - `images/<input hash>/`: `vmlinuz`, `initrd.cpio`, `image.json` (the [`GuestImage`]).
//!
//! Everything is made in a temporary directory next to its final place and renamed into
//! place, so a crash never leaves a half-made entry and concurrent builders do not clash.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The meta-package whose dependency names the kernel package.
pub const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";
/// The package that provides a statically linked busybox.
pub const BUSYBOX_PACKAGE: &str = "busybox-static";
/// Modules the guest needs (virtio PCI transport, virtio networking, and virtio-serial for
/// an agent channel such as the one Nova gives a guest); their
/// dependencies are added from the modules' own `depends=` info.
pub const ROOT_MODULES: &[&str] = &["virtio_pci", "virtio_net", "virtio_console"];
/// Where the agent sits in the guest.
pub const AGENT_GUEST_PATH: &str = "sbin/vmbeam-guest-agent";
/// Bump when the image layout or /init changes in a way the inputs do not show.
const BUILDER_VERSION: &str = "vmbeam-lab-image-1";

/// What to build the image from.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// Cache directory, e.g. /var/cache/vmbeam-lab.
    pub cache_dir: PathBuf,
    /// The statically linked `vmbeam-guest-agent`.
    pub agent_binary: PathBuf,
}

/// A built image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestImage {
    /// The kernel (bzImage).
    pub kernel: PathBuf,
    /// The initramfs (uncompressed newc cpio).
    pub initrd: PathBuf,
    /// `uname -r` of the kernel, e.g. 6.1.0-56-cloud-amd64.
    pub kernel_version: String,
    /// Short hash of kernel and initrd contents.
    pub id: String,
}

/// Building the image failed. Each message says what to do.
#[derive(thiserror::Error, Debug)]
pub enum ImageError {
    #[error(
        "the guest agent binary {0} does not exist: build it with \
         CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS=\"-C target-feature=+crt-static\" \
         cargo build --release -p vmbeam-guest-agent --target x86_64-unknown-linux-gnu"
    )]
    AgentMissing(PathBuf),
    #[error(
        "the guest agent binary {path} {problem}: it must be a statically linked x86_64 ELF \
         program (build with CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS=\"-C target-feature=+crt-static\" \
         cargo build --release -p vmbeam-guest-agent --target x86_64-unknown-linux-gnu)"
    )]
    AgentNotStatic { path: PathBuf, problem: String },
    #[error("cannot run `{program}`: {source} ({hint})")]
    Spawn {
        program: String,
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error(
        "apt does not know {0}, even after `apt-get update`: this needs a Debian 12 (bookworm) \
         host with the main component in its apt sources"
    )]
    UnknownPackage(String),
    #[error("{package} unpacked without {what} (in {dir}): delete {dir} and try again")]
    BadPackage {
        package: String,
        what: String,
        dir: PathBuf,
    },
    #[error(
        "busybox from {BUSYBOX_PACKAGE} ({0}) is not statically linked, so it cannot run in \
         the initramfs: delete it from the cache and try again"
    )]
    BusyboxNotStatic(PathBuf),
    #[error("kernel module {module} (needed by {needed_by}) is neither a module nor built into kernel {kernel}")]
    ModuleMissing {
        module: String,
        needed_by: String,
        kernel: String,
    },
    #[error("kernel module {0} is not an ELF file this builder understands: {1}")]
    BadModule(PathBuf, String),
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ImageError {
    let path = path.to_path_buf();
    move |source| ImageError::Io { what, path, source }
}

/// The kernel command line for a lab guest: serial console on ttyS0 (the agent's channel
/// is ttyS1), reboot on panic (libvirt's on_reboot=destroy then ends the domain), no
/// speculative-execution mitigations (they only slow TCG down), and the agent's and
/// /init's settings.
pub fn kernel_cmdline(
    mem_mib: u64,
    dirty_rate: u64,
    ip_cidr: &str,
    gateway: Option<&str>,
) -> String {
    debug_assert!(!ip_cidr.contains(char::is_whitespace));
    let mut s = format!(
        "console=ttyS0 panic=-1 quiet mitigations=off vmbeam.mem_mib={mem_mib} vmbeam.dirty_rate={dirty_rate} vmbeam.ip={ip_cidr}"
    );
    if let Some(gw) = gateway {
        debug_assert!(!gw.contains(char::is_whitespace));
        s.push_str(&format!(" vmbeam.gw={gw}"));
    }
    s
}

/// The kernel command line of the lab image booted by someone else (Nova: the image's
/// `os_command_line`): no network set-up, no HTTP server, the agent speaking QGA on the
/// virtio-serial port Nova's `hw_qemu_guest_agent=yes` adds (libvirt is its client).
pub fn foreign_kernel_cmdline(fill_mib: u64, dirty_rate: u64, chan: &str) -> String {
    debug_assert!(!chan.contains(char::is_whitespace));
    format!(
        "console=ttyS0 panic=-1 quiet mitigations=off vmbeam.mem_mib={fill_mib} vmbeam.dirty_rate={dirty_rate} vmbeam.http_port=off vmbeam.chan=qga:{chan}"
    )
}

/// The most a lab guest with `guest_ram_mib` of RAM can fill (`vmbeam.mem_mib`).
///
/// The agent refuses a fill above the guest's MemAvailable minus 24 MiB. Measured with
/// this image (Debian 6.1 cloud kernel, QEMU 7.2 `-machine pc`), RAM minus MemAvailable
/// is 64-80 MiB up to 512 MiB of RAM, 140-180 MiB from 640 MiB to 1.5 GiB, 193 at 2 GiB,
/// 218 at 3 GiB and 340 at 4 GiB (the PCI hole); `RAM - 112 - RAM/8` stays at least
/// 13 MiB under the limit everywhere measured.
pub fn max_fill_mib(guest_ram_mib: u64) -> u64 {
    guest_ram_mib.saturating_sub(112 + guest_ram_mib / 8)
}

/// Builds the guest image, or returns the cached one if its inputs did not change.
pub fn build_image(spec: &ImageSpec) -> Result<GuestImage, ImageError> {
    let agent = read_agent(&spec.agent_binary)?;
    let cache = &spec.cache_dir;
    for d in ["debs", "pkgs", "images"] {
        std::fs::create_dir_all(cache.join(d)).map_err(io_err("cannot create", &cache.join(d)))?;
    }
    let mut apt = Apt::default();
    let kernel_pkg = apt.kernel_package()?;
    let kernel_root = fetch_package(cache, &kernel_pkg, &mut apt)?;
    let busybox_root = fetch_package(cache, BUSYBOX_PACKAGE, &mut apt)?;

    let (kernel_version, vmlinuz) = find_kernel(&kernel_pkg, &kernel_root)?;
    let busybox_path = busybox_root.join("bin/busybox");
    let busybox = std::fs::read(&busybox_path).map_err(|_| ImageError::BadPackage {
        package: BUSYBOX_PACKAGE.into(),
        what: "bin/busybox".into(),
        dir: busybox_root.clone(),
    })?;
    if elf_info(&busybox).map(|e| e.interp).unwrap_or(true) {
        return Err(ImageError::BusyboxNotStatic(busybox_path));
    }
    let mod_dir = kernel_root.join("lib/modules").join(&kernel_version);
    let modules = resolve_modules(&mod_dir, &kernel_version, ROOT_MODULES)?;
    let init = init_script(&kernel_version, &modules);

    // The cache key: everything that goes into the image.
    let kernel_bytes = std::fs::read(&vmlinuz).map_err(io_err("cannot read", &vmlinuz))?;
    let mut module_files = Vec::new();
    for m in &modules {
        let data = std::fs::read(&m.path).map_err(io_err("cannot read", &m.path))?;
        module_files.push((m.name.clone(), data));
    }
    let mut h = Sha256::new();
    for part in [
        BUILDER_VERSION.as_bytes(),
        &kernel_bytes,
        &busybox,
        &agent,
        init.as_bytes(),
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    for (name, data) in &module_files {
        h.update(name.as_bytes());
        h.update((data.len() as u64).to_le_bytes());
        h.update(data);
    }
    let key = hex::encode(&h.finalize()[..10]);
    let dir = cache.join("images").join(&key);
    if let Some(img) = load_cached(&dir) {
        tracing::debug!(id = %img.id, dir = %dir.display(), "reusing the cached guest image");
        return Ok(img);
    }

    tracing::info!(kernel = %kernel_version, dir = %dir.display(), "building the lab guest image");
    let tmp = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(cache.join("images"))
        .map_err(io_err(
            "cannot create a temporary directory in",
            &cache.join("images"),
        ))?;
    let initrd = initramfs(&kernel_version, &busybox, &agent, &init, &module_files)?;
    let mut id = Sha256::new();
    id.update(&kernel_bytes);
    id.update(&initrd);
    let id = hex::encode(&id.finalize()[..6]);
    write_file(&tmp.path().join("vmlinuz"), &kernel_bytes)?;
    write_file(&tmp.path().join("initrd.cpio"), &initrd)?;
    let img = GuestImage {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.cpio"),
        kernel_version,
        id,
    };
    let json = serde_json::to_vec_pretty(&img).expect("GuestImage serializes");
    write_file(&tmp.path().join("image.json"), &json)?;
    write_file(&tmp.path().join("init"), init.as_bytes())?;
    let tmp = tmp.keep();
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another builder may have won the race with the same inputs.
        return load_cached(&dir).ok_or_else(|| io_err("cannot move the new image to", &dir)(e));
    }
    Ok(img)
}

fn write_file(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    std::fs::write(path, data).map_err(io_err("cannot write", path))
}

fn load_cached(dir: &Path) -> Option<GuestImage> {
    let img: GuestImage =
        serde_json::from_slice(&std::fs::read(dir.join("image.json")).ok()?).ok()?;
    (img.kernel.is_file() && img.initrd.is_file()).then_some(img)
}

/// Reads the agent binary and checks that it can run in the initramfs.
fn read_agent(path: &Path) -> Result<Vec<u8>, ImageError> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ImageError::AgentMissing(path.into()))
        }
        Err(e) => return Err(io_err("cannot read", path)(e)),
    };
    let not_static = |problem: &str| ImageError::AgentNotStatic {
        path: path.into(),
        problem: problem.into(),
    };
    let info = elf_info(&data).map_err(|e| not_static(&format!("is not an ELF file ({e})")))?;
    if info.machine != EM_X86_64 {
        return Err(not_static("is not an x86_64 program"));
    }
    if info.interp {
        return Err(not_static(
            "is dynamically linked (it has an ELF interpreter)",
        ));
    }
    Ok(data)
}

/// Runs a command and returns its stdout; stderr goes into the error.
fn run(
    program: &str,
    args: &[&str],
    cwd: Option<&Path>,
    hint: &'static str,
) -> Result<String, ImageError> {
    let mut c = Command::new(program);
    c.args(args).env("LC_ALL", "C");
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    let out = c.output().map_err(|source| ImageError::Spawn {
        program: program.into(),
        hint,
        source,
    })?;
    if !out.status.success() {
        return Err(ImageError::CommandFailed {
            command: format!("{program} {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

const APT_HINT: &str = "the lab needs a Debian host with apt";

/// apt, with at most one `apt-get update` per build.
#[derive(Default)]
pub(crate) struct Apt {
    updated: bool,
}

impl Apt {
    /// Runs `apt-get update` unless it already ran; false if it already had.
    fn update_once(&mut self) -> Result<bool, ImageError> {
        if self.updated {
            return Ok(false);
        }
        tracing::info!("running apt-get update (the package lists are missing or stale)");
        run("apt-get", &["update", "-qq"], None, APT_HINT)?;
        self.updated = true;
        Ok(true)
    }

    /// The versioned kernel package, e.g. linux-image-6.1.0-56-cloud-amd64.
    pub(crate) fn kernel_package(&mut self) -> Result<String, ImageError> {
        loop {
            let out = run(
                "apt-cache",
                &["depends", KERNEL_META_PACKAGE],
                None,
                APT_HINT,
            );
            if let Some(p) = out.as_deref().ok().and_then(parse_kernel_depends) {
                return Ok(p);
            }
            if !self.update_once()? {
                return Err(ImageError::UnknownPackage(KERNEL_META_PACKAGE.into()));
            }
        }
    }

    /// Downloads `package` into `dir`, returns the .deb's file name.
    fn download(&mut self, package: &str, dir: &Path) -> Result<String, ImageError> {
        loop {
            // As root, apt would try to drop to the _apt user, who cannot write `dir`.
            let r = run(
                "apt-get",
                &["download", "-qq", "-o", "APT::Sandbox::User=root", package],
                Some(dir),
                APT_HINT,
            );
            match r {
                Ok(_) => {
                    let debs = list_debs(dir, package)?;
                    return debs
                        .into_iter()
                        .last()
                        .ok_or_else(|| ImageError::CommandFailed {
                            command: format!("apt-get download {package}"),
                            status: "success".into(),
                            stderr: format!("no {package}_*.deb appeared in {}", dir.display()),
                        });
                }
                // Missing or stale lists (the version they name is gone from the mirror).
                Err(e) => {
                    if !self.update_once()? {
                        return Err(match e {
                            ImageError::CommandFailed { stderr, .. }
                                if stderr.contains("Unable to locate") =>
                            {
                                ImageError::UnknownPackage(package.into())
                            }
                            e => e,
                        });
                    }
                }
            }
        }
    }
}

/// The versioned package in `apt-cache depends linux-image-cloud-amd64` output.
fn parse_kernel_depends(out: &str) -> Option<String> {
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(|p| {
            p.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
        .find(|p| p.starts_with("linux-image-") && p != KERNEL_META_PACKAGE)
}

/// `PACKAGE_*.deb` files in `dir`, sorted by name.
fn list_debs(dir: &Path, package: &str) -> Result<Vec<String>, ImageError> {
    let prefix = format!("{package}_");
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map_err(io_err("cannot list", dir))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        .collect();
    v.sort();
    Ok(v)
}

/// Makes sure `package`'s .deb is in `debs/` and unpacked in `pkgs/`; returns the
/// unpacked root.
pub(crate) fn fetch_package(
    cache: &Path,
    package: &str,
    apt: &mut Apt,
) -> Result<PathBuf, ImageError> {
    let debs = cache.join("debs");
    let deb = match list_debs(&debs, package)?.into_iter().last() {
        Some(d) => d,
        None => {
            tracing::info!(package, "downloading");
            let tmp = tempfile::Builder::new()
                .prefix(".download-")
                .tempdir_in(&debs)
                .map_err(io_err("cannot create a temporary directory in", &debs))?;
            let name = apt.download(package, tmp.path())?;
            std::fs::rename(tmp.path().join(&name), debs.join(&name))
                .map_err(io_err("cannot move into", &debs))?;
            name
        }
    };
    let root = cache.join("pkgs").join(deb.trim_end_matches(".deb"));
    if !root.is_dir() {
        tracing::info!(deb = %deb, "unpacking");
        let tmp = tempfile::Builder::new()
            .prefix(".unpack-")
            .tempdir_in(cache.join("pkgs"))
            .map_err(io_err(
                "cannot create a temporary directory in",
                &cache.join("pkgs"),
            ))?;
        let deb_path = debs.join(&deb);
        run(
            "dpkg",
            &[
                "-x",
                &deb_path.to_string_lossy(),
                &tmp.path().to_string_lossy(),
            ],
            None,
            "dpkg is part of every Debian system",
        )?;
        let tmp = tmp.keep();
        if let Err(e) = std::fs::rename(&tmp, &root) {
            let _ = std::fs::remove_dir_all(&tmp);
            if !root.is_dir() {
                return Err(io_err("cannot move the unpacked package to", &root)(e));
            }
        }
    }
    Ok(root)
}

/// The kernel version and bzImage of an unpacked kernel package.
pub(crate) fn find_kernel(package: &str, root: &Path) -> Result<(String, PathBuf), ImageError> {
    let boot = root.join("boot");
    let bad = |what: &str| ImageError::BadPackage {
        package: package.into(),
        what: what.into(),
        dir: root.to_path_buf(),
    };
    let mut versions: Vec<String> = std::fs::read_dir(&boot)
        .map_err(|_| bad("boot/"))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("vmlinuz-")
                .map(str::to_string)
        })
        .collect();
    versions.sort();
    let v = match versions.as_slice() {
        [v] => v.clone(),
        [] => return Err(bad("boot/vmlinuz-*")),
        _ => return Err(bad("exactly one boot/vmlinuz-*")),
    };
    if !root.join("lib/modules").join(&v).is_dir() {
        return Err(bad(&format!("lib/modules/{v}")));
    }
    let p = boot.join(format!("vmlinuz-{v}"));
    Ok((v, p))
}

// ---------------------------------------------------------------------------------------
// Kernel modules

/// One module to load, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Name with underscores (as `lsmod` shows it).
    pub name: String,
    /// The .ko file in the unpacked kernel package.
    pub path: PathBuf,
}

fn module_name(file_stem: &str) -> String {
    file_stem.replace('-', "_")
}

/// The modules (and their dependencies, dependencies first) needed for `roots`, skipping
/// built-in ones. Read from the modules' own `.modinfo` (the package has no modules.dep:
/// depmod runs only when it is installed).
pub fn resolve_modules(
    mod_dir: &Path,
    kernel_version: &str,
    roots: &[&str],
) -> Result<Vec<Module>, ImageError> {
    let mut files = BTreeMap::new();
    let mut stack = vec![mod_dir.join("kernel")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)
            .map_err(io_err("cannot list", &d))?
            .flatten()
        {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(stem) = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".ko"))
            {
                files.insert(module_name(stem), p);
            }
        }
    }
    let builtin: BTreeSet<String> = std::fs::read_to_string(mod_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            Path::new(l)
                .file_name()?
                .to_str()?
                .strip_suffix(".ko")
                .map(module_name)
        })
        .collect();
    let mut deps_cache: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut lookup = |name: &str| -> Result<Option<Vec<String>>, ImageError> {
        if let Some(d) = deps_cache.get(name) {
            return Ok(Some(d.clone()));
        }
        let Some(path) = files.get(name) else {
            return Ok(None);
        };
        let data = std::fs::read(path).map_err(io_err("cannot read", path))?;
        let deps = module_depends(&data).map_err(|e| ImageError::BadModule(path.clone(), e))?;
        deps_cache.insert(name.to_string(), deps.clone());
        Ok(Some(deps))
    };
    let order = load_order(roots, &mut lookup, &builtin, kernel_version)?;
    Ok(order
        .into_iter()
        .map(|name| Module {
            path: files[&name].clone(),
            name,
        })
        .collect())
}

/// A module's dependencies, or `None` if there is no such loadable module.
type DepLookup<'a> = dyn FnMut(&str) -> Result<Option<Vec<String>>, ImageError> + 'a;

/// Depth-first: each module after its dependencies. `lookup` gives a module's
/// dependencies, or `None` if there is no such loadable module.
fn load_order(
    roots: &[&str],
    lookup: &mut DepLookup,
    builtin: &BTreeSet<String>,
    kernel_version: &str,
) -> Result<Vec<String>, ImageError> {
    fn visit(
        name: &str,
        needed_by: &str,
        lookup: &mut DepLookup,
        builtin: &BTreeSet<String>,
        kernel_version: &str,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) -> Result<(), ImageError> {
        if !seen.insert(name.to_string()) {
            return Ok(());
        }
        let Some(deps) = lookup(name)? else {
            if builtin.contains(name) {
                return Ok(());
            }
            return Err(ImageError::ModuleMissing {
                module: name.into(),
                needed_by: needed_by.into(),
                kernel: kernel_version.into(),
            });
        };
        for d in &deps {
            visit(d, name, lookup, builtin, kernel_version, seen, order)?;
        }
        order.push(name.to_string());
        Ok(())
    }
    let (mut seen, mut order) = (BTreeSet::new(), Vec::new());
    for r in roots {
        let r = module_name(r);
        visit(
            &r,
            "the lab guest",
            lookup,
            builtin,
            kernel_version,
            &mut seen,
            &mut order,
        )?;
    }
    Ok(order)
}

/// The `depends=` list in a module's `.modinfo` section.
pub fn module_depends(ko: &[u8]) -> Result<Vec<String>, String> {
    let info = elf_info(ko)?;
    let modinfo = info.section(ko, ".modinfo").ok_or("no .modinfo section")?;
    Ok(modinfo
        .split(|&b| b == 0)
        .filter_map(|kv| kv.strip_prefix(b"depends="))
        .flat_map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter(|d| !d.is_empty())
        .map(|d| module_name(&d))
        .collect())
}

// ---------------------------------------------------------------------------------------
// ELF (only what is needed: is it static, where is a section)

const EM_X86_64: u16 = 62;
const PT_INTERP: u32 = 3;

struct ElfInfo {
    machine: u16,
    interp: bool,
    /// (name, file offset, size)
    sections: Vec<(String, usize, usize)>,
}

impl ElfInfo {
    fn section<'a>(&self, data: &'a [u8], name: &str) -> Option<&'a [u8]> {
        let (_, off, size) = self.sections.iter().find(|(n, _, _)| n == name)?;
        data.get(*off..off.checked_add(*size)?)
    }
}

fn rd_u16(d: &[u8], o: usize) -> Result<u16, String> {
    d.get(o..o + 2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .ok_or_else(|| format!("truncated at {o}"))
}

fn rd_u32(d: &[u8], o: usize) -> Result<u32, String> {
    d.get(o..o + 4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        .ok_or_else(|| format!("truncated at {o}"))
}

fn rd_u64(d: &[u8], o: usize) -> Result<usize, String> {
    d.get(o..o + 8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
        .ok_or_else(|| format!("truncated at {o}"))
}

/// Parses the parts of a 64-bit little-endian ELF file this builder needs.
fn elf_info(d: &[u8]) -> Result<ElfInfo, String> {
    if d.len() < 64 || &d[..4] != b"\x7fELF" {
        return Err("no ELF magic".into());
    }
    if d[4] != 2 || d[5] != 1 {
        return Err("not a 64-bit little-endian ELF".into());
    }
    let machine = rd_u16(d, 0x12)?;
    let (phoff, shoff) = (rd_u64(d, 0x20)?, rd_u64(d, 0x28)?);
    let (phentsize, phnum) = (rd_u16(d, 0x36)? as usize, rd_u16(d, 0x38)? as usize);
    let (shentsize, shnum, shstrndx) = (
        rd_u16(d, 0x3a)? as usize,
        rd_u16(d, 0x3c)? as usize,
        rd_u16(d, 0x3e)? as usize,
    );
    let mut interp = false;
    for i in 0..phnum {
        if rd_u32(d, phoff + i * phentsize)? == PT_INTERP {
            interp = true;
        }
    }
    let mut raw = Vec::with_capacity(shnum);
    for i in 0..shnum {
        let o = shoff + i * shentsize;
        raw.push((
            rd_u32(d, o)? as usize,
            rd_u64(d, o + 24)?,
            rd_u64(d, o + 32)?,
        ));
    }
    let strtab = raw
        .get(shstrndx)
        .and_then(|&(_, off, size)| d.get(off..off.checked_add(size)?));
    let sections = match strtab {
        Some(st) => raw
            .iter()
            .map(|&(name, off, size)| {
                let n = st
                    .get(name..)
                    .and_then(|s| s.split(|&b| b == 0).next())
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .unwrap_or_default();
                (n, off, size)
            })
            .collect(),
        None => Vec::new(),
    };
    Ok(ElfInfo {
        machine,
        interp,
        sections,
    })
}

// ---------------------------------------------------------------------------------------
// The initramfs

/// The /init script: mounts, modules, the `VMBEAM-INIT` marker, networking from
/// `vmbeam.ip=` / `vmbeam.gw=`, then the agent as PID 1.
pub fn init_script(kernel_version: &str, modules: &[Module]) -> String {
    let mods: Vec<&str> = modules.iter().map(|m| m.name.as_str()).collect();
    format!(
        r#"#!/bin/busybox sh
# VMBeam lab guest /init (generated by vmbeam-lab's image builder).
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /usr/bin /usr/sbin
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
for m in {mods}; do
    insmod /lib/modules/{kernel_version}/$m.ko || echo "VMBEAM-INIT insmod $m failed"
done
echo "VMBEAM-INIT kernel=$(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)"
ip=""; gw=""
for kv in $(cat /proc/cmdline); do
    case "$kv" in
        vmbeam.ip=*) ip="${{kv#vmbeam.ip=}}" ;;
        vmbeam.gw=*) gw="${{kv#vmbeam.gw=}}" ;;
    esac
done
ip link set lo up
if [ -n "$ip" ]; then
    n=0
    while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done
    if ip addr add "$ip" dev eth0 && ip link set eth0 up; then
        [ -n "$gw" ] && {{ ip route add default via "$gw" || echo "VMBEAM-INIT default route via $gw failed"; }}
        echo "VMBEAM-INIT eth0 $ip gw=${{gw:-none}}"
    else
        echo "VMBEAM-INIT eth0 setup failed (ip=$ip)"
    fi
fi
exec /{AGENT_GUEST_PATH}
"#,
        mods = mods.join(" "),
    )
}

/// Writes a newc ("070701") cpio archive, as the kernel's initramfs unpacker reads it.
pub struct CpioWriter<W: Write> {
    out: W,
    ino: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    /// A writer into `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            ino: 1,
            written: 0,
        }
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.out.write_all(&[0u8; 3][..n])?;
        self.written += n as u64;
        Ok(())
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: fixed, for reproducible images
            data.len(),
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() + 1,
            0, // check
        );
        self.ino += 1;
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.written += (header.len() + name.len() + 1) as u64;
        self.pad()?;
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        self.pad()
    }

    /// A directory.
    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, 0o040000 | perm, (0, 0), &[])
    }

    /// A regular file.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, 0o100000 | perm, (0, 0), data)
    }

    /// A symbolic link.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, 0o120777, (0, 0), target.as_bytes())
    }

    /// A character device node.
    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, 0o020000 | perm, (major, minor), &[])
    }

    /// Writes the trailer and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.ino = 0;
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        Ok(self.out)
    }
}

/// The initramfs archive.
fn initramfs(
    kernel_version: &str,
    busybox: &[u8],
    agent: &[u8],
    init: &str,
    modules: &[(String, Vec<u8>)],
) -> Result<Vec<u8>, ImageError> {
    let build = || -> io::Result<Vec<u8>> {
        let mut w = CpioWriter::new(Vec::with_capacity(busybox.len() + agent.len() + (1 << 20)));
        for d in [
            "bin",
            "dev",
            "lib",
            "lib/modules",
            "proc",
            "run",
            "sbin",
            "sys",
            "tmp",
            "usr",
            "usr/bin",
            "usr/sbin",
        ] {
            w.dir(d, 0o755)?;
        }
        // The kernel opens /dev/console for init's stdio before /init can mount devtmpfs.
        w.char_dev("dev/console", 0o600, 5, 1)?;
        w.file("bin/busybox", 0o755, busybox)?;
        w.symlink("bin/sh", "busybox")?;
        w.file("init", 0o755, init.as_bytes())?;
        let mdir = format!("lib/modules/{kernel_version}");
        w.dir(&mdir, 0o755)?;
        for (name, data) in modules {
            w.file(&format!("{mdir}/{name}.ko"), 0o644, data)?;
        }
        w.file(AGENT_GUEST_PATH, 0o755, agent)?;
        w.finish()
    };
    build().map_err(|source| ImageError::Io {
        what: "cannot write the initramfs in memory",
        path: PathBuf::from("initrd.cpio"),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One archive entry: (name, mode, rdev, data).
    type Entry = (String, u32, (u32, u32), Vec<u8>);

    /// Parses a newc archive back.
    fn parse_cpio(mut d: &[u8]) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut pos = 0usize;
        let field = |h: &[u8], i: usize| {
            u32::from_str_radix(std::str::from_utf8(&h[6 + i * 8..14 + i * 8]).unwrap(), 16)
                .unwrap()
        };
        loop {
            assert_eq!(&d[..6], b"070701", "magic at {pos}");
            let h = &d[..110];
            let (mode, size, rmaj, rmin, namesize) = (
                field(h, 1),
                field(h, 6),
                field(h, 9),
                field(h, 10),
                field(h, 11),
            );
            assert_eq!(field(h, 5), 0, "mtime");
            let name = std::str::from_utf8(&d[110..110 + namesize as usize - 1])
                .unwrap()
                .to_string();
            let data_start = (110 + namesize as usize).div_ceil(4) * 4;
            let data = d[data_start..data_start + size as usize].to_vec();
            let next = (data_start + size as usize).div_ceil(4) * 4;
            pos += next;
            d = &d[next..];
            if name == "TRAILER!!!" {
                assert!(d.is_empty());
                return out;
            }
            out.push((name, mode, (rmaj, rmin), data));
        }
    }

    #[test]
    fn cpio_round_trip_and_alignment() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin", 0o755).unwrap();
        w.file("bin/x", 0o755, b"hello").unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.char_dev("dev/console", 0o600, 5, 1).unwrap();
        w.file("empty", 0o644, b"").unwrap();
        let a = w.finish().unwrap();
        assert_eq!(a.len() % 4, 0);
        let e = parse_cpio(&a);
        assert_eq!(e.len(), 5);
        assert_eq!(e[0], ("bin".into(), 0o040755, (0, 0), vec![]));
        assert_eq!(e[1], ("bin/x".into(), 0o100755, (0, 0), b"hello".to_vec()));
        assert_eq!(
            e[2],
            ("bin/sh".into(), 0o120777, (0, 0), b"busybox".to_vec())
        );
        assert_eq!(e[3], ("dev/console".into(), 0o020600, (5, 1), vec![]));
        assert_eq!(e[4].3, Vec::<u8>::new());
    }

    #[test]
    fn cpio_is_readable_by_gnu_cpio_when_present() {
        let Ok(out) = Command::new("cpio").arg("--version").output() else {
            eprintln!("cpio is not installed: checked only by the built-in parser");
            return;
        };
        assert!(out.status.success());
        let mut w = CpioWriter::new(Vec::new());
        w.dir("d", 0o755).unwrap();
        w.file("d/f", 0o644, b"abc").unwrap();
        w.symlink("d/l", "f").unwrap();
        let a = w.finish().unwrap();
        let mut c = Command::new("cpio")
            .args(["-i", "-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(&a).unwrap();
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success());
        assert_eq!(String::from_utf8_lossy(&o.stdout), "d\nd/f\nd/l\n");
    }

    #[test]
    fn kernel_cmdline_has_what_init_and_agent_read() {
        let c = kernel_cmdline(256, 5000, "198.18.2.10/16", Some("198.18.0.1"));
        assert!(c.starts_with("console=ttyS0 "));
        for kv in [
            "vmbeam.mem_mib=256",
            "vmbeam.dirty_rate=5000",
            "vmbeam.ip=198.18.2.10/16",
            "vmbeam.gw=198.18.0.1",
        ] {
            assert!(c.split(' ').any(|t| t == kv), "{kv} missing in {c}");
        }
        assert!(!kernel_cmdline(64, 0, "10.0.0.2/24", None).contains("vmbeam.gw"));
    }

    #[test]
    fn max_fill_stays_under_the_measured_limits() {
        // (guest RAM, MemAvailable at the agent's start), both MiB.
        for (ram, avail) in [
            (192, 123),
            (256, 186),
            (512, 432),
            (640, 501),
            (768, 617),
            (896, 732),
            (1024, 854),
            (1104, 929),
            (1536, 1353),
            (2048, 1855),
            (3072, 2854),
            (4096, 3756),
        ] {
            let fill = max_fill_mib(ram);
            assert!(
                fill > 0 && fill + 24 <= avail,
                "{ram} MiB: fill {fill} vs available {avail}"
            );
        }
        assert_eq!(max_fill_mib(64), 0);
    }

    #[test]
    fn apt_cache_depends_output() {
        let out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            parse_kernel_depends(out).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        assert_eq!(parse_kernel_depends("linux-image-cloud-amd64\n"), None);
        assert_eq!(parse_kernel_depends(""), None);
    }

    fn virtio_graph() -> BTreeMap<String, Vec<String>> {
        // As in Debian 12's 6.1 cloud kernel.
        [
            ("virtio_net", vec!["virtio_ring", "virtio", "net_failover"]),
            (
                "virtio_pci",
                vec![
                    "virtio_ring",
                    "virtio_pci_modern_dev",
                    "virtio_pci_legacy_dev",
                    "virtio",
                ],
            ),
            ("virtio_console", vec!["virtio", "virtio_ring"]),
            ("net_failover", vec!["failover"]),
            ("failover", vec![]),
            ("virtio", vec!["virtio_ring"]),
            ("virtio_ring", vec![]),
            ("virtio_pci_modern_dev", vec![]),
            ("virtio_pci_legacy_dev", vec![]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
        .collect()
    }

    #[test]
    fn modules_load_after_their_dependencies() {
        let g = virtio_graph();
        let mut lookup = |n: &str| Ok(g.get(n).cloned());
        let order = load_order(ROOT_MODULES, &mut lookup, &BTreeSet::new(), "6.1").unwrap();
        assert_eq!(
            order,
            [
                "virtio_ring",
                "virtio_pci_modern_dev",
                "virtio_pci_legacy_dev",
                "virtio",
                "virtio_pci",
                "failover",
                "net_failover",
                "virtio_net",
                "virtio_console"
            ]
        );
        for (i, m) in order.iter().enumerate() {
            for d in &g[m] {
                assert!(order[..i].contains(d), "{d} must come before {m}");
            }
        }
    }

    #[test]
    fn builtin_modules_are_skipped_and_missing_ones_reported() {
        let mut g = virtio_graph();
        g.remove("failover");
        let builtin: BTreeSet<String> = ["failover".to_string()].into();
        let mut lookup = |n: &str| Ok(g.get(n).cloned());
        let order = load_order(&["virtio_net"], &mut lookup, &builtin, "6.1").unwrap();
        assert!(!order.contains(&"failover".to_string()));
        let err = load_order(&["virtio_net"], &mut lookup, &BTreeSet::new(), "6.1").unwrap_err();
        assert!(
            err.to_string()
                .contains("kernel module failover (needed by net_failover)"),
            "{err}"
        );
    }

    /// A minimal ELF64 with the given program header types and sections.
    fn fake_elf(machine: u16, phdrs: &[u32], sections: &[(&str, &[u8])]) -> Vec<u8> {
        let mut shstr = vec![0u8];
        let mut names = Vec::new();
        for (n, _) in sections.iter().copied().chain([(".shstrtab", &[][..])]) {
            names.push(shstr.len() as u32);
            shstr.extend_from_slice(n.as_bytes());
            shstr.push(0);
        }
        let mut d = vec![0u8; 64];
        d[..4].copy_from_slice(b"\x7fELF");
        d[4] = 2;
        d[5] = 1;
        d[0x12..0x14].copy_from_slice(&machine.to_le_bytes());
        let phoff = d.len();
        for &t in phdrs {
            let mut p = vec![0u8; 56];
            p[..4].copy_from_slice(&t.to_le_bytes());
            d.extend(p);
        }
        let mut offs = Vec::new();
        for (_, data) in sections {
            offs.push((d.len(), data.len()));
            d.extend_from_slice(data);
        }
        offs.push((d.len(), shstr.len()));
        d.extend_from_slice(&shstr);
        let shoff = d.len();
        d.extend(vec![0u8; 64]); // the null section
        for (i, (off, size)) in offs.iter().enumerate() {
            let mut s = vec![0u8; 64];
            s[..4].copy_from_slice(&names[i].to_le_bytes());
            s[24..32].copy_from_slice(&(*off as u64).to_le_bytes());
            s[32..40].copy_from_slice(&(*size as u64).to_le_bytes());
            d.extend(s);
        }
        d[0x20..0x28].copy_from_slice(&(phoff as u64).to_le_bytes());
        d[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        d[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        d[0x38..0x3a].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
        d[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        d[0x3c..0x3e].copy_from_slice(&((sections.len() + 2) as u16).to_le_bytes());
        d[0x3e..0x40].copy_from_slice(&((sections.len() + 1) as u16).to_le_bytes());
        d
    }

    #[test]
    fn modinfo_depends_are_read() {
        let ko = fake_elf(
            EM_X86_64,
            &[],
            &[
                (".text", b"\x90\x90"),
                (
                    ".modinfo",
                    b"license=GPL\0depends=virtio_ring,virtio,net-failover\0name=virtio_net\0",
                ),
            ],
        );
        assert_eq!(
            module_depends(&ko).unwrap(),
            ["virtio_ring", "virtio", "net_failover"]
        );
        let ko = fake_elf(
            EM_X86_64,
            &[],
            &[(".modinfo", b"depends=\0name=virtio_ring\0")],
        );
        assert!(module_depends(&ko).unwrap().is_empty());
        assert!(module_depends(&fake_elf(EM_X86_64, &[], &[(".text", b"")])).is_err());
        assert!(module_depends(b"not an elf").is_err());
    }

    #[test]
    fn agent_must_be_static_x86_64() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent");
        let err = read_agent(&p).unwrap_err();
        assert!(matches!(err, ImageError::AgentMissing(_)));
        assert!(err.to_string().contains("+crt-static"), "{err}");
        std::fs::write(&p, fake_elf(EM_X86_64, &[1, PT_INTERP], &[])).unwrap();
        assert!(read_agent(&p)
            .unwrap_err()
            .to_string()
            .contains("dynamically linked"));
        std::fs::write(&p, fake_elf(183, &[1], &[])).unwrap();
        assert!(read_agent(&p)
            .unwrap_err()
            .to_string()
            .contains("not an x86_64"));
        std::fs::write(&p, b"#!/bin/sh\n").unwrap();
        assert!(read_agent(&p)
            .unwrap_err()
            .to_string()
            .contains("not an ELF"));
        std::fs::write(&p, fake_elf(EM_X86_64, &[1], &[])).unwrap();
        assert!(read_agent(&p).is_ok());
        // This test binary itself is dynamically linked.
        let me = std::env::current_exe().unwrap();
        if !elf_info(&std::fs::read(&me).unwrap()).unwrap().interp {
            eprintln!("note: the test binary is static");
        }
    }

    #[test]
    fn init_loads_modules_in_order_then_execs_the_agent() {
        let mods: Vec<Module> = ["virtio_ring", "virtio", "virtio_net"]
            .iter()
            .map(|n| Module {
                name: n.to_string(),
                path: PathBuf::from(format!("/x/{n}.ko")),
            })
            .collect();
        let s = init_script("6.1.0-56-cloud-amd64", &mods);
        assert!(s.starts_with("#!/bin/busybox sh\n"));
        assert!(s.contains("for m in virtio_ring virtio virtio_net; do"));
        assert!(s.contains("insmod /lib/modules/6.1.0-56-cloud-amd64/$m.ko"));
        assert!(s.contains("mount -t devtmpfs devtmpfs /dev"));
        let marker = s.find("echo \"VMBEAM-INIT").unwrap();
        assert!(marker > s.find("insmod").unwrap());
        assert!(s.trim_end().ends_with("exec /sbin/vmbeam-guest-agent"));
        assert!(s.contains("${kv#vmbeam.ip=}"), "format! escapes kept: {s}");
    }

    /// Building and booting for real: needs root (apt-get download, dpkg -x into the
    /// cache), the Debian mirror, qemu-system-x86_64 and the static agent built first. Only
    /// with the `root-tests` feature (scripts/test.sh's root-units tier, or
    /// lab/assets/image-boot-test.sh): a plain `cargo test` needs no root and starts no QEMU.
    #[cfg(feature = "root-tests")]
    mod boot {
        use super::*;

        fn boot_test_spec() -> ImageSpec {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let agent = std::env::var_os("VMBEAM_AGENT_BINARY")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    root.join("target/x86_64-unknown-linux-gnu/release/vmbeam-guest-agent")
                });
            let cache = std::env::var_os("VMBEAM_LAB_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/cache/vmbeam-lab"));
            ImageSpec {
                cache_dir: cache,
                agent_binary: agent,
            }
        }

        struct Qemu(std::process::Child);

        impl Drop for Qemu {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }

        /// Boots the image with `fill_mib` for the agent in `ram_mib` of guest RAM under TCG;
        /// returns (ms to `VMBEAM-INIT`, ms to `VMBEAM-AGENT READY`, the READY line).
        fn boot_and_check(img: &GuestImage, fill_mib: u64, ram_mib: u64) -> (u128, u128, String) {
            use std::io::{BufRead, BufReader, Read};
            use std::net::TcpStream;
            use std::os::unix::net::UnixStream;
            use std::time::{Duration, Instant};

            let dir = tempfile::tempdir().unwrap();
            let console = dir.path().join("console.log");
            let chan = dir.path().join("chan.sock");
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            // User-mode networking restricted to the guest (no outside access); hostfwd
            // lets the test reach the agent's HTTP server on loopback.
            let netdev = format!("user,id=n0,restrict=on,net=198.18.0.0/24,host=198.18.0.2,hostfwd=tcp:127.0.0.1:{port}-198.18.0.15:80");
            let t0 = Instant::now();
            let _q = Qemu(
                Command::new("qemu-system-x86_64")
                    .args([
                        "-accel",
                        "tcg",
                        "-machine",
                        "pc",
                        "-m",
                        &ram_mib.to_string(),
                        "-smp",
                        "1",
                    ])
                    .args([
                        "-nodefaults",
                        "-no-user-config",
                        "-display",
                        "none",
                        "-monitor",
                        "none",
                        "-no-reboot",
                    ])
                    .arg("-kernel")
                    .arg(&img.kernel)
                    .arg("-initrd")
                    .arg(&img.initrd)
                    .args([
                        "-append",
                        &kernel_cmdline(fill_mib, 1000, "198.18.0.15/24", Some("198.18.0.2")),
                    ])
                    .args(["-serial", &format!("file:{}", console.display())])
                    .args([
                        "-serial",
                        &format!("unix:{},server=on,wait=off", chan.display()),
                    ])
                    .args(["-netdev", &netdev, "-device", "virtio-net-pci,netdev=n0"])
                    .stdin(std::process::Stdio::null())
                    .spawn()
                    .expect("start qemu-system-x86_64"),
            );
            let deadline = t0 + Duration::from_secs(60 + fill_mib / 16);
            let mut init_ms = None;
            let ready = loop {
                let log = std::fs::read_to_string(&console).unwrap_or_default();
                if init_ms.is_none() && log.contains("VMBEAM-INIT") {
                    init_ms = Some(t0.elapsed().as_millis());
                }
                if let Some(l) = log.lines().find(|l| l.contains("VMBEAM-AGENT READY")) {
                    break l.trim().to_string();
                }
                assert!(
                    Instant::now() < deadline,
                    "no VMBEAM-AGENT READY; console:\n{log}"
                );
                std::thread::sleep(Duration::from_millis(20));
            };
            let ready_ms = t0.elapsed().as_millis();
            let log = std::fs::read_to_string(&console).unwrap();
            assert!(
                log.contains("VMBEAM-INIT eth0 198.18.0.15/24"),
                "console:\n{log}"
            );
            let boot_id = ready
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix("boot_id="))
                .unwrap()
                .to_string();

            let s = UnixStream::connect(&chan).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(60 + fill_mib / 8)))
                .unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            let mut ask = |id: u32, cmd: &str| -> String {
                writeln!(w, "{id} {cmd}").unwrap();
                let mut l = String::new();
                loop {
                    l.clear();
                    r.read_line(&mut l).unwrap();
                    if let Some(a) = l.trim_end().strip_prefix(&format!("{id} ")) {
                        return a.to_string();
                    }
                }
            };
            let pong = ask(1, "PING");
            assert!(
                pong.starts_with(&format!("PONG boot_id={boot_id} ")),
                "{pong}"
            );
            let t = Instant::now();
            let check = ask(2, "CHECK");
            let check_ms = t.elapsed().as_millis();
            assert!(check.starts_with("CHECK PASS "), "{check}");
            let phys = ask(3, "PHYS 0");
            assert!(phys.starts_with("PHYS page=0 addr=0x"), "{phys}");
            let stats = ask(4, "STATS");
            assert!(stats.contains(&format!("boot_id={boot_id}")), "{stats}");
            assert_eq!(ask(5, "CORRUPT 7"), "OK corrupted=7 offset=2048");
            let fail = ask(6, "CHECK");
            assert!(
                fail.starts_with("CHECK FAIL ") && fail.contains("first_bad=7"),
                "{fail}"
            );

            let mut http = TcpStream::connect(("127.0.0.1", port)).unwrap();
            http.set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            write!(http, "GET /stats HTTP/1.0\r\n\r\n").unwrap();
            let mut body = String::new();
            http.read_to_string(&mut body).unwrap();
            assert!(
                body.contains(&format!("\"boot_id\":\"{boot_id}\"")),
                "{body}"
            );

            eprintln!(
                "boot fill_mib={fill_mib} ram_mib={ram_mib}: VMBEAM-INIT {} ms, READY {ready_ms} ms, CHECK {check_ms} ms; {ready}; {stats}",
                init_ms.unwrap_or(0)
            );
            (init_ms.unwrap_or(0), ready_ms, ready)
        }

        #[test]
        fn build_is_cached_and_the_image_boots_to_a_passing_check() {
            let spec = boot_test_spec();
            let img = build_image(&spec).unwrap();
            assert_eq!(
                build_image(&spec).unwrap(),
                img,
                "second build reuses the cache"
            );
            assert_eq!(img.id.len(), 12);
            boot_and_check(&img, 64, 256);
        }

        #[test]
        fn the_image_boots_with_1024_mib_filled() {
            let img = build_image(&boot_test_spec()).unwrap();
            // Under 1-3 GiB of guest RAM the kernel keeps 170-220 MiB unavailable and the agent
            // asks for 24 MiB of headroom on top (it refuses a fill that does not fit).
            boot_and_check(&img, 1024, 1024 + 224);
        }
    }
}
