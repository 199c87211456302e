//! `vmbeam-lab up|status|down|exec|guest ...`: the one-machine virtual IaaS cloud.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, Context};
use clap::Subcommand;
use vmbeam_lab::state::Shaping;
use vmbeam_lab::{guest, LabError, UpOptions, UpOutcome};

use vmbeam_cli::{exit, Coded};

#[derive(Subcommand, Debug)]
pub enum LabCmd {
    /// Create the cloud VMs (idempotent)
    Up {
        /// Number of cloud VMs
        #[arg(long, default_value_t = 2)]
        cloud_vms: u32,
        /// Shape each cloud VM's link to this many Mbit/s (the paper: 100 slow, 300 fast)
        #[arg(long, value_name = "MBIT")]
        bandwidth: Option<u32>,
        /// Add this one-way latency to each cloud VM's link (needs sch_netem)
        #[arg(long, value_name = "MS")]
        latency: Option<u32>,
        /// Put a cloud VM in another virtual IaaS cloud (own id and key), e.g. cvm3=other
        #[arg(long = "cloud-of", value_name = "CVM=CLOUD", value_parser = parse_pair)]
        cloud_of: Vec<(String, String)>,
        /// Give a cloud VM a pool of its own (not shared: not co-located for VMBeam)
        #[arg(long = "own-pool", value_name = "CVM")]
        own_pool: Vec<String>,
        /// Tell every cloud VM's libvirt this directory is shared storage (qemu.conf's
        /// shared_filesystems), e.g. Nova's instances directory on the host's file system
        #[arg(long = "shared-fs", value_name = "DIR")]
        shared_fs: Vec<PathBuf>,
    },
    /// Show the cloud VMs, their libvirt URIs and domains, and the pool
    Status,
    /// Remove everything the lab made
    Down,
    /// The nested lab: cloud VMs as real QEMU VMs under a private host libvirtd, with
    /// vmbeam-host on the host (slow under TCG; the namespace lab above stays the default)
    Nested {
        #[command(subcommand)]
        cmd: NestedCmd,
    },
    /// Lab guests
    Guest {
        #[command(subcommand)]
        cmd: GuestCmd,
    },
    /// (internal) Run a command as its parent and subreaper, reaping what it orphans
    #[command(hide = true)]
    Reap {
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
    /// Kill a cloud VM's daemon with SIGKILL, as a crash would (fault tests); `restart` brings it back
    Crash {
        /// Cloud VM name
        cvm: String,
        /// libvirtd or vmbeamd
        daemon: String,
    },
    /// Start again every lab daemon that is not running, as a service manager would
    Restart,
    /// Run a command inside a cloud VM (its network, mount and UTS namespaces)
    Exec {
        /// Cloud VM name
        cvm: String,
        /// Command and arguments
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum NestedCmd {
    /// Start the private host libvirtd, vmbeam-host and the cloud VMs, and wait until each
    /// cloud VM's libvirtd answers and vmbeam-host has answered each vmbeamd's HELLO
    Up {
        /// Number of cloud VMs
        #[arg(long, default_value_t = 2)]
        cloud_vms: u32,
        /// How many of them (the last ones) belong to a second virtual IaaS cloud
        /// (`nested-other`, its own cloud key)
        #[arg(long, default_value_t = 0)]
        other_cloud: u32,
    },
    /// Guests inside the nested cloud VMs (the lab's agent guest, beam-enabled, its RAM a
    /// device from vmbeam-host)
    Guest {
        #[command(subcommand)]
        cmd: NestedGuestCmd,
    },
    /// Zero-copy vs traditional on the nested lab: moves a running nested guest between the
    /// first two cloud VMs RUNS times each way; prints medians and ratios (TCG-in-TCG times)
    Bench {
        /// The nested guest to move (`nested guest start` it first)
        guest: String,
        /// Moves per mode
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Where the JSON report goes
        #[arg(long, value_name = "DIR", default_value = "target/nested-bench")]
        out: PathBuf,
    },
    /// Show the host libvirtd, vmbeam-host and each cloud VM (its libvirtd, its host channel)
    Status,
    /// Run a command inside a nested cloud VM (as root, through the lab's exec channel);
    /// exits with the command's status
    Exec {
        /// Cloud VM name
        cvm: String,
        /// Command and arguments
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
    /// Remove everything `nested up` made
    Down,
}

#[derive(Subcommand, Debug)]
pub enum NestedGuestCmd {
    /// Define and start a guest in a cloud VM through its libvirtd; waits for its agent
    Start {
        name: String,
        /// Cloud VM to start it in
        #[arg(long, default_value = "cvm1")]
        on: String,
        /// Guest memory
        #[arg(long, value_name = "MIB", default_value_t = 256)]
        memory: u64,
        /// Memory the agent fills and verifies
        #[arg(long, value_name = "MIB", default_value_t = 64)]
        fill: u64,
    },
    /// Verify the guest's memory where it runs (its agent, through that cloud VM's libvirt)
    Check { name: String },
    /// Destroy and undefine the guest wherever it is defined
    Destroy { name: String },
}

#[derive(Subcommand, Debug)]
pub enum GuestCmd {
    /// Define and boot a guest whose agent fills, dirties and verifies its memory
    Create {
        name: String,
        /// Guest memory
        #[arg(long, value_name = "MIB")]
        memory: u64,
        /// Memory the agent fills and verifies (default: all but ~80 MiB)
        #[arg(long, value_name = "MIB")]
        fill: Option<u64>,
        /// Pages per second the agent dirties
        #[arg(long, value_name = "PAGES_PER_S", default_value_t = 0)]
        dirty_rate: u64,
        /// Virtual CPUs (more than one: threads of one core)
        #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
        vcpus: u32,
        /// Cloud VM to start it on
        #[arg(long, value_name = "CLOUD_VM")]
        on: String,
        /// Do not beam-enable it (plain anonymous memory)
        #[arg(long)]
        no_beam: bool,
    },
    /// Print (JSON) the lab guest image and the kernel command line for booting it
    /// elsewhere, e.g. as Glance images Nova boots (agent on Nova's guest-agent channel)
    Image {
        /// Guest memory the image will be booted with (the fill is checked against it)
        #[arg(long, value_name = "MIB")]
        memory: u64,
        /// Memory the agent fills and verifies (default: all but what the kernel needs)
        #[arg(long, value_name = "MIB")]
        fill: Option<u64>,
        /// Pages per second the agent dirties
        #[arg(long, value_name = "PAGES_PER_S", default_value_t = 0)]
        dirty_rate: u64,
    },
    /// Check the guest's memory integrity wherever it runs now (exit 0 PASS, 1 FAIL); NAME
    /// is a lab guest or any domain of a cloud VM with an agent channel (Nova's guests)
    Check { name: String },
    /// Show the guest agent's counters (achieved dirty rate, passes, bad pages)
    Stats { name: String },
    /// Destroy and undefine a guest
    Destroy { name: String },
}

fn code_for(e: &LabError) -> u8 {
    match e {
        LabError::NotUp
        | LabError::NotRoot
        | LabError::Sys(vmbeam_lab::sys::SysError::Missing { .. }) => exit::NOT_READY,
        LabError::AlreadyUp { .. }
        | LabError::Conflict(_)
        | LabError::UnknownCloudVm { .. }
        | LabError::UnknownGuest { .. }
        | LabError::BadInput(_)
        | LabError::Unsupported(_) => exit::BAD_INPUT,
        _ => exit::FAILED,
    }
}

pub fn lab<T>(r: Result<T, LabError>) -> anyhow::Result<T> {
    r.map_err(|e| {
        let c = code_for(&e);
        anyhow::Error::new(e).context(Coded(c))
    })
}

/// The directory of this binary: the build's target directory (`target/<profile>`), where
/// `vmbeam`, `vmbeamd` and `vmbeam-hook` are built beside it.
fn own_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locate the vmbeam-lab binary")?;
    Ok(exe.parent().map(PathBuf::from).unwrap_or_default())
}

/// Finds the statically linked guest agent: $VMBEAM_GUEST_AGENT, next to this binary, or
/// in the workspace's static-target directory.
pub fn agent_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("VMBEAM_GUEST_AGENT") {
        return Ok(p.into());
    }
    let dir = own_dir()?;
    let profile = dir.file_name().map(|s| s.to_owned()).unwrap_or_default();
    // The static build (scripts/build.sh) first: the workspace's own build of the agent,
    // next to this binary, is dynamically linked. An installed layout has only the sibling.
    let candidates = [
        dir.join("../x86_64-unknown-linux-gnu")
            .join(&profile)
            .join("vmbeam-guest-agent"),
        dir.join("../x86_64-unknown-linux-gnu/release/vmbeam-guest-agent"),
        dir.join("vmbeam-guest-agent"),
    ];
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        anyhow!(
            "the static guest agent is not built: run scripts/build.sh (or set VMBEAM_GUEST_AGENT)"
        )
        .context(Coded(exit::NOT_READY))
    })
}

/// Where vmbeamd and vmbeam-hook are: next to this binary.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let dir = own_dir()?;
    for b in ["vmbeamd", "vmbeam-hook"] {
        sibling(&dir, b)?;
    }
    Ok(dir)
}

/// The product's `vmbeam` binary, next to this one: what runs inside the cloud VMs.
pub fn vmbeam_binary() -> anyhow::Result<PathBuf> {
    sibling(&own_dir()?, "vmbeam")
}

fn sibling(dir: &std::path::Path, name: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(anyhow!("{} is missing: run scripts/build.sh", p.display())
            .context(Coded(exit::NOT_READY)))
    }
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(a, b)| !a.is_empty() && !b.is_empty())
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .ok_or_else(|| format!("'{s}': expected CVM=CLOUD"))
}

pub fn run(cmd: LabCmd) -> anyhow::Result<()> {
    match cmd {
        LabCmd::Up {
            cloud_vms,
            bandwidth,
            latency,
            cloud_of,
            own_pool,
            shared_fs,
        } => {
            let t = Instant::now();
            let opts = UpOptions {
                cloud_vms,
                shaping: Shaping {
                    bandwidth_mbit: bandwidth,
                    latency_ms: latency,
                },
                agent_binary: agent_binary()?,
                bin_dir: bin_dir()?,
                other_clouds: cloud_of,
                own_pools: own_pool,
                shared_fs,
            };
            match lab(vmbeam_lab::up(&opts))? {
                UpOutcome::Created(s) => {
                    println!(
                        "lab up in {:.1} s: {} cloud VM(s)",
                        t.elapsed().as_secs_f64(),
                        s.cloud_vms.len()
                    );
                    print_made(&s);
                }
                UpOutcome::AlreadyUp { state, repaired } => {
                    println!("lab already up: {} cloud VM(s)", state.cloud_vms.len());
                    for r in repaired {
                        println!("  repaired: {r}");
                    }
                    print_made(&state);
                }
            }
            Ok(())
        }
        LabCmd::Status => {
            let st = lab(vmbeam_lab::status())?;
            if let Some(a) = &st.state.accel {
                println!("accelerator: {} ({})", a.accel, a.reason);
            }
            let sh = st.state.shaping;
            println!(
                "cloud network: {}{}",
                sh.bandwidth_mbit
                    .map(|b| format!("{b} Mbit/s"))
                    .unwrap_or_else(|| "unshaped".into()),
                sh.latency_ms
                    .map(|l| format!(", +{l} ms"))
                    .unwrap_or_default()
            );
            for c in &st.cloud_vms {
                println!(
                    "{:<6} {:<28} {}",
                    c.cvm.name,
                    c.cvm.uri,
                    if c.healthy {
                        "up"
                    } else {
                        "DEGRADED (run `vmbeam-lab up` to repair)"
                    }
                );
                if let Some(e) = &c.error {
                    println!("         error: {e}");
                }
                for (d, s) in &c.domains {
                    let ip = st.state.guest(d).map(|g| g.ip.as_str()).unwrap_or("-");
                    println!("         {d:<20} {s:<10} {ip}");
                }
            }
            println!(
                "pool {} (seen as {} in every cloud VM):",
                st.state.pool.display(),
                vmbeam_lab::POOL_DIR
            );
            if st.pool_files.is_empty() {
                println!("  (empty)");
            }
            for (f, size, res) in &st.pool_files {
                println!(
                    "  {f:<48} {:>8} MiB ({} MiB resident)",
                    size >> 20,
                    res >> 20
                );
            }
            Ok(())
        }
        LabCmd::Down => {
            let r = lab(vmbeam_lab::down())?;
            println!(
                "lab down: removed {} domain(s), {} process(es), {} namespace(s), {} mount(s), {} link(s), {} dir(s)",
                r.domains, r.processes, r.namespaces, r.mounts, r.links, r.dirs
            );
            if !r.problems.is_empty() {
                for p in &r.problems {
                    eprintln!("  problem: {p}");
                }
                return Err(anyhow!(
                    "lab down left {} problem(s) behind",
                    r.problems.len()
                ));
            }
            Ok(())
        }
        LabCmd::Exec { cvm, command } => {
            let st = lab(vmbeam_lab::require_state())?;
            let c = lab(st
                .cloud_vm(&cvm)
                .cloned()
                .ok_or_else(|| LabError::UnknownCloudVm {
                    name: cvm.clone(),
                    known: st.cloud_vms.iter().map(|c| c.name.clone()).collect(),
                }))?;
            // `vmbeam` inside a cloud VM is the product's binary built beside this one.
            let mut command = command;
            if command[0] == "vmbeam" {
                command[0] = vmbeam_binary()?.to_string_lossy().into_owned();
            }
            let holder = c.holder_pid.to_string();
            let status = std::process::Command::new("nsenter")
                .args(["-t", &holder, "-m", "-u", "-n", "--wd=/", "--"])
                .args(&command)
                .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
                .status()
                .context("run nsenter")?;
            // The command said what went wrong; pass its exit code on, adding nothing.
            if !status.success() {
                std::process::exit(status.code().unwrap_or(1));
            }
            Ok(())
        }
        LabCmd::Crash { cvm, daemon } => {
            let daemon = lab(daemon.parse::<vmbeam_lab::Daemon>())?;
            let pid = lab(vmbeam_lab::crash(&cvm, daemon))?;
            println!("{cvm}: {daemon:?} (pid {pid}) killed with SIGKILL");
            Ok(())
        }
        LabCmd::Restart => {
            for what in lab(vmbeam_lab::restart_dead())? {
                println!("{what}");
            }
            Ok(())
        }
        LabCmd::Guest { cmd } => guest_cmd(cmd),
        LabCmd::Nested { cmd } => nested_cmd(cmd),
        LabCmd::Reap { command } => std::process::exit(vmbeam_lab::sys::reap_for(&command)),
    }
}

fn print_made(s: &vmbeam_lab::state::LabState) {
    if let Some(a) = &s.accel {
        println!("  accelerator: {} ({})", a.accel, a.reason);
    }
    for c in &s.cloud_vms {
        println!(
            "  {:<6} {:<14} {:<28} netns {}",
            c.name, c.addr, c.uri, c.netns
        );
    }
    println!(
        "  pool: {} (tmpfs; {} inside each cloud VM)",
        s.pool.display(),
        vmbeam_lab::POOL_DIR
    );
    if let Some(l) = &s.loadgen_netns {
        println!(
            "  load generator: netns {l}, {} on the guest network",
            vmbeam_lab::net::LOADGEN_ADDR
        );
    }
}

fn nested_guest_cmd(cmd: NestedGuestCmd) -> anyhow::Result<()> {
    use vmbeam_lab::nested::guest;
    match cmd {
        NestedGuestCmd::Start {
            name,
            on,
            memory,
            fill,
        } => {
            let image = lab(vmbeam_lab::guest_image(&agent_binary()?))?;
            let g = lab(guest::start(
                &guest::NestedGuestSpec {
                    name,
                    memory_mib: memory,
                    fill_mib: fill,
                    on,
                },
                &image,
            ))?;
            println!(
                "{} runs in {} (boot id {}), agent answered after {:.1} s",
                g.name, g.on, g.boot_id, g.boot_secs
            );
            Ok(())
        }
        NestedGuestCmd::Check { name } => {
            let (on, r) = lab(guest::check(&name))?;
            println!("{name} in {on}: {}", r.line);
            if !r.pass {
                return Err(anyhow!("{name}'s memory check failed").context(Coded(exit::FAILED)));
            }
            Ok(())
        }
        NestedGuestCmd::Destroy { name } => {
            let gone = lab(guest::destroy(&name))?;
            if gone.is_empty() {
                return Err(
                    anyhow!("no guest {name} in the nested lab").context(Coded(exit::BAD_INPUT))
                );
            }
            println!("{name} destroyed and undefined in {}", gone.join(", "));
            Ok(())
        }
    }
}

fn nested_cmd(cmd: NestedCmd) -> anyhow::Result<()> {
    use vmbeam_lab::nested;
    match cmd {
        NestedCmd::Up {
            cloud_vms,
            other_cloud,
        } => {
            let dir = own_dir()?;
            for b in ["vmbeamd", "vmbeam", "vmbeam-hook", "vmbeam-host"] {
                sibling(&dir, b)?;
            }
            let made = lab(nested::up(&nested::NestedUpOptions {
                cloud_vms,
                other_cloud,
                lab_binary: dir.join("vmbeam-lab"),
                bin_dir: dir,
            }))?;
            let st = &made.state;
            if let Some(a) = &st.accel {
                println!("  accelerator: {} ({})", a.accel, a.reason);
            }
            println!(
                "  host libvirtd: {} (netns {})",
                nested::host_uri(),
                nested::HOST_NETNS
            );
            println!(
                "  vmbeam-host: pid {}, state {}, log {}",
                st.vmbeam_host.pid,
                st.host_state_dir.display(),
                st.host_log.display()
            );
            for c in &st.cloud_vms {
                println!(
                    "  {:<5} {:<15} {:<30} {:<13} ready in {:.1} s (console {})",
                    c.name,
                    c.addr,
                    c.uri,
                    c.cloud,
                    c.ready_secs,
                    c.console.display()
                );
            }
            let t = Instant::now();
            let s = lab(nested::wait_healthy(std::time::Duration::from_secs(120)))?;
            nested::render_status(&s, &mut std::io::stdout())?;
            let healthy = s
                .cloud_vms
                .iter()
                .all(|c| c.libvirtd.is_ok() && c.hello && c.host_connected);
            println!(
                "nested lab up in {:.1} s (image and probe {:.1} s, host side {:.1} s, then {:.1} s until every HELLO)",
                made.total_secs + t.elapsed().as_secs_f64(),
                made.image_secs,
                made.host_secs - made.image_secs,
                t.elapsed().as_secs_f64()
            );
            if !healthy {
                return Err(anyhow!(
                    "the nested lab is up but not every cloud VM is reachable and greeted (see above); `vmbeam-lab nested down` removes it"
                )
                .context(Coded(exit::FAILED)));
            }
            Ok(())
        }
        NestedCmd::Exec { cvm, command } => {
            let (rc, out) = lab(nested::exec(&cvm, &command))?;
            print!("{out}");
            // The command said what went wrong; pass its exit status on, adding nothing.
            if rc != 0 {
                std::process::exit(rc.clamp(1, 255));
            }
            Ok(())
        }
        NestedCmd::Guest { cmd } => nested_guest_cmd(cmd),
        NestedCmd::Bench { guest, runs, out } => {
            let r = vmbeam_bench::nested::run(&guest, runs).map_err(|e| {
                let code = match &e {
                    vmbeam_bench::Error::Lab(l) => code_for(l),
                    _ => exit::FAILED,
                };
                anyhow!(e).context(Coded(code))
            })?;
            for x in &r.runs {
                println!(
                    "  {:<11} {} -> {}: {:.0} ms, downtime {:.0} ms, stream {:.0} B, cloud network {} B, host CPU {:.2} s",
                    x.mode, x.from, x.to, x.total_ms, x.downtime_ms, x.stream_bytes, x.cloud_net_bytes, x.host_cpu_s
                );
            }
            print!("{}", vmbeam_bench::nested::render(&r));
            let p = vmbeam_bench::nested::save(&r, &out)?;
            println!("JSON: {}", p.display());
            Ok(())
        }
        NestedCmd::Status => {
            let s = lab(nested::status())?;
            nested::render_status(&s, &mut std::io::stdout())?;
            Ok(())
        }
        NestedCmd::Down => {
            let t = Instant::now();
            let r = lab(nested::down())?;
            println!(
                "nested lab down in {:.1} s: {} domain(s) destroyed, {} process(es) ended, {} namespace(s), {} director(y/ies) and {} leftover backing file(s) removed",
                t.elapsed().as_secs_f64(),
                r.domains,
                r.processes,
                r.namespaces,
                r.dirs,
                r.files
            );
            if !r.problems.is_empty() {
                return Err(
                    anyhow!("left behind: {}", r.problems.join("; ")).context(Coded(exit::FAILED))
                );
            }
            Ok(())
        }
    }
}

fn guest_cmd(cmd: GuestCmd) -> anyhow::Result<()> {
    match cmd {
        GuestCmd::Create {
            name,
            memory,
            fill,
            dirty_rate,
            vcpus,
            on,
            no_beam,
        } => {
            let t = Instant::now();
            let st = lab(vmbeam_lab::require_state())?;
            drop(st);
            let image = lab(vmbeam_lab::guest_image(&agent_binary()?))?;
            let rec = lab(guest::create(
                &guest::GuestSpec {
                    name,
                    memory_mib: memory,
                    fill_mib: fill,
                    dirty_rate,
                    vcpus,
                    on,
                    beam: !no_beam,
                },
                &image,
            ))?;
            println!(
                "guest {} running on {} ({} MiB, {} vCPU, {} MiB filled, {} pages/s, {}), agent ready in {:.1} s",
                rec.name,
                rec.created_on,
                rec.memory_mib,
                rec.vcpus,
                rec.fill_mib,
                rec.dirty_rate,
                rec.ip,
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        GuestCmd::Image {
            memory,
            fill,
            dirty_rate,
        } => {
            let fill = lab(guest::fill_for(memory, fill))?;
            let image = lab(vmbeam_lab::guest_image(&agent_binary()?))?;
            let cmdline = vmbeam_lab::image::foreign_kernel_cmdline(
                fill,
                dirty_rate,
                guest::NOVA_AGENT_CHANNEL,
            );
            println!(
                "{}",
                serde_json::json!({
                    "id": image.id,
                    "kernel": image.kernel,
                    "initrd": image.initrd,
                    "kernel_version": image.kernel_version,
                    "memory_mib": memory,
                    "fill_mib": fill,
                    "cmdline": cmdline,
                })
            );
            Ok(())
        }
        GuestCmd::Check { name } => {
            let (on, r) = lab(guest::check(&name))?;
            if r.pass {
                println!("PASS {name} on {on}: {}", r.line);
                Ok(())
            } else {
                println!("FAIL {name} on {on}: {}", r.line);
                Err(anyhow!("memory check of {name} failed").context(Coded(exit::FAILED)))
            }
        }
        GuestCmd::Stats { name } => {
            let st = lab(vmbeam_lab::require_state())?;
            let (on, mut c) = lab(guest::agent(&st, &name))?;
            let kv = lab(c
                .stats(std::time::Duration::from_secs(10))
                .map_err(LabError::from))?;
            println!("{name} on {on}:");
            for (k, v) in kv {
                println!("  {k:<18} {v}");
            }
            Ok(())
        }
        GuestCmd::Destroy { name } => {
            let on = lab(guest::destroy(&name))?;
            println!("guest {name} destroyed (was defined on: {})", on.join(", "));
            Ok(())
        }
    }
}
