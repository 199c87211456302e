//! Guests of the nested lab: the lab's agent guest, beam-enabled, defined and started
//! through a nested cloud VM's own libvirtd (its `qemu+tcp` URI, from [`HOST_NETNS`]), its
//! RAM a device from `vmbeam-host` (the cloud VM's vmbeamd ALLOCs it in the start hook).
//!
//! The guest has no NIC: zero-copy moves it without one, and it keeps the cloud network's
//! byte counts to the migration's own traffic. The agent speaks the QEMU guest agent
//! protocol on `org.qemu.guest_agent.0` (as for Nova's guests) and is asked through the
//! cloud VM's libvirt (`virsh qemu-agent-command`), so nothing but libvirt crosses into the
//! cloud VM for a check.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::agent::{field, CheckResult};
use crate::guest::NOVA_AGENT_CHANNEL;
use crate::image::{foreign_kernel_cmdline, GuestImage};
use crate::nested::{NestedCvm, NestedState, HOST_NETNS};
use crate::sys;
use crate::LabError;

/// How long a nested guest may take to boot to its agent (TCG in TCG: 72-151 s measured).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(420);

/// What to start.
#[derive(Debug, Clone)]
pub struct NestedGuestSpec {
    pub name: String,
    pub memory_mib: u64,
    /// Memory the agent fills and verifies.
    pub fill_mib: u64,
    /// The cloud VM to start it in.
    pub on: String,
}

/// A started guest.
#[derive(Debug, Clone)]
pub struct NestedGuest {
    pub name: String,
    pub on: String,
    /// The agent's boot id (the same after every migration).
    pub boot_id: String,
    /// Seconds from `virsh start` to the agent's first answer.
    pub boot_secs: f64,
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// The guest's console log (a host path: the cloud VM's directory is shared with it, so the
/// console of a guest booting inside can be read from the host).
pub fn console(cvm: &NestedCvm, name: &str) -> PathBuf {
    cvm.dir.join("log").join(format!("guest-{name}.console"))
}

/// The beam-enabled domain XML of nested guest `spec` for cloud VM `cvm`.
pub fn domain_xml(
    spec: &NestedGuestSpec,
    uuid: &str,
    cvm: &NestedCvm,
    cloud: &str,
    image: &GuestImage,
    domain_type: &str,
) -> Result<String, LabError> {
    let cmdline = foreign_kernel_cmdline(spec.fill_mib, 0, NOVA_AGENT_CHANNEL);
    let xml = format!(
        r#"<domain type='{domain_type}'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <description>VMBeam nested lab guest</description>
  <memory unit='MiB'>{mem}</memory>
  <currentMemory unit='MiB'>{mem}</currentMemory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='file'>
      <source path='{console}' append='on'/>
      <target port='0'/>
    </serial>
    <channel type='unix'>
      <target type='virtio' name='{NOVA_AGENT_CHANNEL}'/>
    </channel>
    <memballoon model='none'/>
  </devices>
</domain>
"#,
        name = spec.name,
        mem = spec.memory_mib,
        kernel = image.kernel.display(),
        initrd = image.initrd.display(),
        console = console(cvm, &spec.name).display(),
    );
    let bad = |e: String| LabError::Setup(format!("beam-enable {}: {e}", spec.name));
    let meta = vmbeam_core::BeamMetadata {
        cloud: vmbeam_core::CloudId::new(cloud).map_err(|e| bad(e.to_string()))?,
        pool: PathBuf::from(crate::POOL_DIR),
        owner: vmbeam_core::HostId::new(&cvm.name).map_err(|e| bad(e.to_string()))?,
        generation: 0,
        pool_file: None,
    };
    vmbeam_core::transform::enable(
        &xml,
        &meta,
        std::path::Path::new(vmbeam_core::domain::DEFAULT_QMP_DIR),
    )
    .map(|r| r.xml)
    .map_err(|e| bad(e.to_string()))
}

/// `virsh -c URI ARGS...` from the cloud network's namespace.
pub fn virsh(cvm: &NestedCvm, args: &[&str]) -> Result<String, LabError> {
    let mut full = vec!["-c", cvm.uri.as_str()];
    full.extend_from_slice(args);
    Ok(sys::run_in_ns(HOST_NETNS, "virsh", &full)?)
}

fn lab() -> Result<NestedState, LabError> {
    NestedState::load()?
        .filter(|s| s.complete)
        .ok_or_else(|| LabError::BadInput("no nested lab is up: run `vmbeam-lab nested up`".into()))
}

fn cvm<'a>(st: &'a NestedState, name: &str) -> Result<&'a NestedCvm, LabError> {
    st.cloud_vms
        .iter()
        .find(|c| c.name == name)
        .ok_or_else(|| LabError::UnknownCloudVm {
            name: name.into(),
            known: st.cloud_vms.iter().map(|c| c.name.clone()).collect(),
        })
}

/// Whether cloud VM `cvm`'s domain runs in the host libvirtd.
pub fn cvm_running(cvm: &NestedCvm) -> Result<bool, LabError> {
    let state = sys::run_in_ns(
        HOST_NETNS,
        "virsh",
        &["-c", &super::host_uri(), "domstate", &cvm.domain],
    )?;
    Ok(state.trim() == "running")
}

/// The cloud VMs where domain `name` is running (one, except in a split brain).
pub fn running_in(name: &str) -> Result<Vec<String>, LabError> {
    let st = lab()?;
    let mut on = Vec::new();
    for c in &st.cloud_vms {
        let names = match virsh(c, &["list", "--name", "--state-running"]) {
            Ok(n) => n,
            // A cloud VM that is not running (killed by a test, say) runs no guest.
            Err(_) if !cvm_running(c)? => continue,
            Err(e) => return Err(e),
        };
        if names.lines().any(|l| l.trim() == name) {
            on.push(c.name.clone());
        }
    }
    Ok(on)
}

/// One agent command through cloud VM `cvm`'s libvirt; the answer line.
pub fn agent_request(cvm: &NestedCvm, name: &str, line: &str) -> Result<String, LabError> {
    let request = serde_json::json!({
        "execute": "vmbeam-command",
        "arguments": {"line": line},
    })
    .to_string();
    // libvirt gives the agent a fixed 5 s to answer its guest-sync before each command; a
    // guest emulated inside an emulated, loaded cloud VM (a moment after it resumed there)
    // can miss that. Only that transport failure is asked again, for up to two minutes;
    // the agent's answer, whatever it is, is returned as it came.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let reply = loop {
        match virsh(
            cvm,
            &["qemu-agent-command", name, &request, "--timeout", "60"],
        ) {
            Err(e)
                if e.to_string().contains("Guest agent is not responding")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_secs(2));
            }
            r => break r?,
        }
    };
    let v: serde_json::Value = serde_json::from_str(reply.trim())
        .map_err(|e| LabError::Setup(format!("{name}'s agent: not JSON: {reply}: {e}")))?;
    v["return"]["line"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| LabError::Setup(format!("{name}'s agent: no answer line: {reply}")))
}

/// Defines and starts `spec` in its cloud VM and waits for its agent's first answer.
pub fn start(spec: &NestedGuestSpec, image: &GuestImage) -> Result<NestedGuest, LabError> {
    if !valid_name(&spec.name) {
        return Err(LabError::BadInput(format!(
            "bad guest name {:?}: use letters, digits, '-' and '_'",
            spec.name
        )));
    }
    if spec.fill_mib == 0 || spec.fill_mib > crate::image::max_fill_mib(spec.memory_mib) {
        return Err(LabError::BadInput(format!(
            "cannot fill {} MiB of a {} MiB guest: use 1 to {} MiB",
            spec.fill_mib,
            spec.memory_mib,
            crate::image::max_fill_mib(spec.memory_mib)
        )));
    }
    let st = lab()?;
    let c = cvm(&st, &spec.on)?;
    let cloud = c.cloud.clone();
    if !running_in(&spec.name)?.is_empty() {
        return Err(LabError::BadInput(format!(
            "a guest named {} already runs in the nested lab",
            spec.name
        )));
    }
    let domain_type = st
        .accel
        .as_ref()
        .map_or("qemu".to_string(), |a| a.domain_type.clone());
    let uuid = super::uuid_v4();
    let xml = domain_xml(spec, &uuid, c, &cloud, image, &domain_type)?;
    let file = c.dir.join(format!("guest-{}.xml", spec.name));
    std::fs::write(&file, &xml)
        .map_err(|e| LabError::io(format!("write {}", file.display()), e))?;
    let file_s = file.to_string_lossy().to_string();
    virsh(c, &["define", &file_s])?;
    let t = Instant::now();
    if let Err(e) = virsh(c, &["start", &spec.name]) {
        let _ = virsh(c, &["undefine", &spec.name]);
        return Err(e);
    }
    let deadline = t + BOOT_TIMEOUT;
    loop {
        match agent_request(c, &spec.name, "PING") {
            Ok(a) => {
                let boot_id = field(&a, "boot_id").ok_or_else(|| {
                    LabError::Setup(format!("{}: bad PING answer {a}", spec.name))
                })?;
                return Ok(NestedGuest {
                    name: spec.name.clone(),
                    on: spec.on.clone(),
                    boot_id,
                    boot_secs: t.elapsed().as_secs_f64(),
                });
            }
            Err(e) if Instant::now() > deadline => {
                return Err(LabError::Setup(format!(
                    "{}'s agent did not answer within {} s (console {}): {e}",
                    spec.name,
                    BOOT_TIMEOUT.as_secs(),
                    console(c, &spec.name).display()
                )));
            }
            Err(_) => std::thread::sleep(Duration::from_secs(3)),
        }
    }
}

/// A full memory check of guest `name` where it runs; the cloud VM and the result.
pub fn check(name: &str) -> Result<(String, CheckResult), LabError> {
    let st = lab()?;
    let on = running_in(name)?;
    let [on] = on.as_slice() else {
        return Err(LabError::Setup(format!(
            "guest {name} runs in {on:?}: expected exactly one cloud VM"
        )));
    };
    let a = agent_request(cvm(&st, on)?, name, "CHECK")?;
    let r = CheckResult::parse(a).map_err(|e| LabError::Setup(format!("{name}'s agent: {e}")))?;
    Ok((on.clone(), r))
}

/// Destroys and undefines guest `name` wherever the nested lab has it.
pub fn destroy(name: &str) -> Result<Vec<String>, LabError> {
    let st = lab()?;
    let mut gone = Vec::new();
    for c in &st.cloud_vms {
        let all = match virsh(c, &["list", "--all", "--name"]) {
            Ok(a) => a,
            Err(_) if !cvm_running(c)? => continue,
            Err(e) => return Err(e),
        };
        if all.lines().any(|l| l.trim() == name) {
            let _ = virsh(c, &["destroy", name]);
            virsh(c, &["undefine", name])?;
            gone.push(c.name.clone());
        }
    }
    Ok(gone)
}
