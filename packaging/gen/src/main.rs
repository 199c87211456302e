//! `vmbeam-pkg-gen --out DIR`: writes the man pages (clap_mangen) and the bash, zsh and fish
//! completions (clap_complete) that the packages ship, from the commands the binaries
//! themselves parse: `vmbeam_cli::command()` and `vmbeamd::cli::command()`.
//!
//! DIR/man/vmbeam.1, DIR/man/vmbeam-SUBCOMMAND[-...].1, DIR/man/vmbeamd.8,
//! DIR/completions/vmbeam.bash, DIR/completions/_vmbeam, DIR/completions/vmbeam.fish.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Command;
use clap_complete::Shell;
use clap_mangen::Man;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() {
    if let Err(e) = run() {
        eprintln!("vmbeam-pkg-gen: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let mut out = None;
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        match a.to_str() {
            Some("--out") => {
                out = Some(PathBuf::from(args.next().ok_or("--out needs a value")?));
            }
            _ => return Err(format!("unknown argument {a:?}; usage: --out DIR").into()),
        }
    }
    let out = out.ok_or("usage: vmbeam-pkg-gen --out DIR")?;
    generate(&out)
}

/// Writes every page and completion file into `out` (see the module docs).
fn generate(out: &Path) -> Result<()> {
    let man_dir = out.join("man");
    let comp_dir = out.join("completions");
    std::fs::create_dir_all(&man_dir)?;
    std::fs::create_dir_all(&comp_dir)?;

    let cli = vmbeam_cli::command();
    write_pages(cli.clone(), &man_dir, "1", VMBEAM_EXTRA)?;
    write_pages(vmbeamd::cli::command(), &man_dir, "8", VMBEAMD_EXTRA)?;

    for (shell, file) in [
        (Shell::Bash, "vmbeam.bash"),
        (Shell::Zsh, "_vmbeam"),
        (Shell::Fish, "vmbeam.fish"),
    ] {
        let mut buf = Vec::new();
        let mut cmd = cli.clone();
        clap_complete::generate(shell, &mut cmd, "vmbeam", &mut buf);
        std::fs::write(comp_dir.join(file), buf)?;
    }
    Ok(())
}

/// Writes the page of `cmd` (with `extra` roff before its VERSION section) and one page per
/// subcommand, recursively, named `PARENT-SUB.SECTION` as clap_mangen names them. Every
/// subcommand's page carries the program's version (clap gives it only to the top command).
fn write_pages(cmd: Command, dir: &Path, section: &str, extra: &str) -> Result<()> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let version = cmd.get_version().unwrap_or_default().to_string();
    fn subpages(cmd: &Command, dir: &Path, section: &str, version: &str) -> Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            subpages(sub, dir, section, version)?;
            let man = Man::new(sub.clone().version(version.to_string())).section(section);
            let mut f = std::fs::File::create(dir.join(format!("{}.{section}", man_title(sub))))?;
            man.render(&mut f)?;
        }
        Ok(())
    }
    subpages(&cmd, dir, section, &version)?;
    let name = man_title(&cmd);
    let man = Man::new(cmd.clone()).section(section);
    let mut f = std::fs::File::create(dir.join(format!("{name}.{section}")))?;
    man.render_title(&mut f)?;
    man.render_name_section(&mut f)?;
    man.render_synopsis_section(&mut f)?;
    man.render_description_section(&mut f)?;
    man.render_options_section(&mut f)?;
    if cmd.has_subcommands() {
        man.render_subcommands_section(&mut f)?;
    }
    f.write_all(extra.as_bytes())?;
    man.render_version_section(&mut f)?;
    Ok(())
}

fn man_title(cmd: &Command) -> String {
    cmd.get_display_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_string()
}

/// Hand-written sections of vmbeam(1).
const VMBEAM_EXTRA: &str = r#".SH NOTES
\fBvmbeam migrate \-\-zero\-copy\fR is not libvirt's \fBvirsh migrate \-\-zerocopy\fR: the latter
only uses MSG_ZEROCOPY on the sending socket and still copies all guest memory over the
network, while VMBeam maps the guest's memory on the destination through the shared beam pool
and sends only device state.
.SH FILES
.TP
.I /etc/vmbeam/vmbeam.conf
This cloud VM's identity: host id, virtual IaaS cloud, beam pool and key file.
.SH SEE ALSO
.BR vmbeamd (8),
.BR virsh (1)
"#;

/// Hand-written sections of vmbeamd(8).
const VMBEAMD_EXTRA: &str = r#".SH SERVICE
vmbeamd runs as root on the system bus as \fBorg.vmbeam.VMBeam1\fR, object
\fB/org/vmbeam/VMBeam1\fR, interfaces \fBorg.vmbeam.VMBeam1.Manager\fR,
\fBorg.vmbeam.VMBeam1.Job\fR and \fBorg.vmbeam.VMBeam1.Hook\fR.
It is started by systemd (\fBvmbeamd.service\fR) at boot, or on demand through D\-Bus
activation. The libvirt hook (\fI/etc/libvirt/hooks/qemu.d/vmbeam\fR) hands libvirt's
QEMU domain events to it.
.PP
Everyone may call the read\-only methods (ListDomains, Status, CoLocation) and read
properties. Migrate and Job.Cancel need root or the polkit action
\fBorg.vmbeam.VMBeam1.migrate\fR, Enable and Disable root or
\fBorg.vmbeam.VMBeam1.enable\fR (by default: an administrator's password); the Hook
interface is for root only.
.SH FILES
.TP
.I /etc/vmbeam/vmbeam.conf
Host id, virtual IaaS cloud, beam pool directory, key file and ticket lifetime.
.TP
.I /etc/vmbeam/cloud.key
The cloud's HMAC key (mode 0600). Every cloud VM of one virtual IaaS cloud needs the same key:
copy one cloud VM's key to the others. The package generates a random key if none exists,
and never replaces it.
.TP
.I /var/lib/vmbeam/pool
The default beam pool directory, shared by the co\-located cloud VMs.
.TP
.I /run/vmbeam
Private QMP sockets and the ticket replay cache.
.SH SEE ALSO
.BR vmbeam (1),
.BR libvirtd (8),
.BR systemctl (1)
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_pages_and_completions_the_packages_ship_and_no_lab() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path()).unwrap();
        let list = |sub: &str| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(dir.path().join(sub))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            list("man"),
            [
                "vmbeam-colocation.1",
                "vmbeam-disable.1",
                "vmbeam-enable.1",
                "vmbeam-migrate.1",
                "vmbeam-status.1",
                "vmbeam.1",
                "vmbeamd.8",
            ]
        );
        assert_eq!(
            list("completions"),
            ["_vmbeam", "vmbeam.bash", "vmbeam.fish"]
        );
        let version = env!("CARGO_PKG_VERSION");
        let page = std::fs::read_to_string(dir.path().join("man/vmbeam.1")).unwrap();
        assert!(
            page.contains(&format!(".TH vmbeam 1  \"vmbeam {version}\"")),
            "{page}"
        );
        assert!(
            page.contains(".SH NOTES") && page.contains(".SH VERSION"),
            "{page}"
        );
        let migrate = std::fs::read_to_string(dir.path().join("man/vmbeam-migrate.1")).unwrap();
        assert!(
            migrate.contains(&format!("\"migrate {version}\""))
                && migrate.contains("\\-\\-zero\\-copy"),
            "{migrate}"
        );
        let daemon = std::fs::read_to_string(dir.path().join("man/vmbeamd.8")).unwrap();
        assert!(
            daemon.contains(".TH vmbeamd 8") && daemon.contains("hook\\-timeout\\-secs"),
            "{daemon}"
        );
        let bash = std::fs::read_to_string(dir.path().join("completions/vmbeam.bash")).unwrap();
        assert!(bash.contains("colocation"), "{bash}");
        assert!(!bash.contains("guest") && !bash.contains("bench"), "{bash}");
    }
}
