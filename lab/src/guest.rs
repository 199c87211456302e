//! Lab guests: a Debian kernel and a busybox initramfs running the VMBeam guest agent,
//! defined and started through the cloud VM's own libvirtd.

use std::path::PathBuf;
use std::time::Duration;

use virt::connect::Connect;
use virt::domain::Domain;

use crate::agent::{wait_ready, AgentClient, CheckResult};
use crate::image::{kernel_cmdline, GuestImage};
use crate::net::{guest_ip, CVM_GUEST_BRIDGE, LOADGEN_ADDR};
use crate::state::{CloudVm, GuestRecord, LabState};
use crate::{LabError, Lock};

/// Path of a guest's agent channel inside its cloud VM.
pub fn agent_socket_inner(name: &str) -> String {
    format!("/run/vmbeam/lab/{name}.agent")
}

/// Path, inside its cloud VM, of the lab's own QMP monitor of a guest's QEMU (a second
/// monitor beside libvirt's and VMBeam's private one). Tests read QEMU's run state through it
/// without touching the product's channels; every QEMU of the guest (the destination's too,
/// from the same XML) makes it in its own cloud VM's /run.
pub fn witness_socket_inner(name: &str) -> String {
    format!("/run/vmbeam/lab/{name}.witness")
}

/// Path of a guest's console log inside its cloud VM.
pub fn console_inner(name: &str) -> String {
    format!("/var/log/libvirt/qemu/{name}.console")
}

/// What to create.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    pub name: String,
    pub memory_mib: u64,
    /// Memory the agent fills and verifies; default: all but what the kernel needs.
    pub fill_mib: Option<u64>,
    pub dirty_rate: u64,
    /// Virtual CPUs; more than one are threads of one core (`<topology threads='N'/>`).
    pub vcpus: u32,
    /// Cloud VM to start it on.
    pub on: String,
    /// Make it beam-enabled (shared file memory in the pool, the private QMP socket,
    /// VMBeam metadata), as `vmbeam enable` would.
    pub beam: bool,
}

/// The beam-enabled form of a lab guest's XML for cloud VM `cvm`.
pub fn beam_xml(xml: &str, cvm: &CloudVm) -> Result<String, LabError> {
    let bad = |e: String| LabError::Setup(format!("beam-enable the guest: {e}"));
    let meta = vmbeam_core::BeamMetadata {
        cloud: vmbeam_core::CloudId::new(&cvm.cloud).map_err(|e| bad(e.to_string()))?,
        pool: PathBuf::from(crate::POOL_DIR),
        owner: vmbeam_core::HostId::new(&cvm.name).map_err(|e| bad(e.to_string()))?,
        generation: 0,
        pool_file: None,
    };
    vmbeam_core::transform::enable(
        xml,
        &meta,
        std::path::Path::new(vmbeam_core::domain::DEFAULT_QMP_DIR),
    )
    .map(|r| r.xml)
    .map_err(|e| bad(e.to_string()))
}

/// Default fill: what is left after the kernel, the unpacked initramfs and the kernel's
/// per-page bookkeeping (measured on the lab kernel; see [`crate::image::max_fill_mib`]).
pub fn default_fill(memory_mib: u64) -> u64 {
    crate::image::max_fill_mib(memory_mib)
}

/// Smallest guest the lab makes.
pub const MIN_MEMORY_MIB: u64 = 160;

/// The memory the agent of a `memory_mib` guest fills: `fill_mib`, or all it can; one
/// clear error for a guest too small or a fill that does not fit.
pub fn fill_for(memory_mib: u64, fill_mib: Option<u64>) -> Result<u64, LabError> {
    if memory_mib < MIN_MEMORY_MIB {
        return Err(LabError::BadInput(format!(
            "--memory {memory_mib} MiB is too small for the lab guest: use at least {MIN_MEMORY_MIB}"
        )));
    }
    let max = default_fill(memory_mib);
    let fill = fill_mib.unwrap_or(max);
    if fill == 0 || fill > max {
        return Err(LabError::BadInput(format!(
            "cannot fill {fill} MiB of a {memory_mib} MiB guest: use 1 to {max} MiB (the rest is its kernel's)"
        )));
    }
    Ok(fill)
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !n.starts_with('.')
}

/// The libvirt domain XML of a lab guest.
pub fn domain_xml(rec: &GuestRecord, image: &GuestImage, domain_type: &str) -> String {
    let cmdline = kernel_cmdline(
        rec.fill_mib,
        rec.dirty_rate,
        &format!("{}/16", rec.ip),
        Some(LOADGEN_ADDR),
    );
    let cpu = if rec.vcpus > 1 {
        format!(
            "\n  <cpu mode='custom' match='exact' check='partial'><model fallback='forbid'>qemu64</model><topology sockets='1' dies='1' cores='1' threads='{}'/></cpu>",
            rec.vcpus
        )
    } else {
        String::new()
    };
    format!(
        r#"<domain type='{domain_type}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <description>VMBeam lab guest</description>
  <memory unit='MiB'>{mem}</memory>
  <currentMemory unit='MiB'>{mem}</currentMemory>
  <vcpu>{vcpus}</vcpu>{cpu}
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
    <serial type='unix'>
      <source mode='bind' path='{agent}'/>
      <target port='1'/>
    </serial>
    <interface type='bridge'>
      <source bridge='{bridge}'/>
      <mac address='{mac}'/>
      <model type='virtio'/>
    </interface>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-qmp'/>
    <qemu:arg value='unix:{witness},server=on,wait=off'/>
  </qemu:commandline>
</domain>
"#,
        name = rec.name,
        uuid = rec.uuid,
        mem = rec.memory_mib,
        vcpus = rec.vcpus.max(1),
        witness = witness_socket_inner(&rec.name),
        kernel = image.kernel.display(),
        initrd = image.initrd.display(),
        console = console_inner(&rec.name),
        agent = agent_socket_inner(&rec.name),
        bridge = CVM_GUEST_BRIDGE,
        mac = rec.mac,
    )
}

fn random_uuid() -> String {
    let b: [u8; 16] = rand::random();
    let mut b = b;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Opens a libvirt connection to a cloud VM.
pub fn connect(cvm: &CloudVm) -> Result<Connect, LabError> {
    Connect::open(Some(&cvm.uri))
        .map_err(|e| LabError::Libvirt(format!("connect to {} ({}): {e}", cvm.name, cvm.uri)))
}

/// Whether `name` is active on `cvm`.
pub fn running_on(cvm: &CloudVm, name: &str) -> Result<bool, LabError> {
    let mut conn = connect(cvm)?;
    let r = Domain::lookup_by_name(&conn, name)
        .ok()
        .map(|d| d.is_active().unwrap_or(false))
        .unwrap_or(false);
    let _ = conn.close();
    Ok(r)
}

/// The cloud VM where `name` runs now.
pub fn locate<'a>(state: &'a LabState, name: &str) -> Result<&'a CloudVm, LabError> {
    if state.guest(name).is_none() {
        return Err(LabError::UnknownGuest {
            name: name.into(),
            known: state.guests.iter().map(|g| g.name.clone()).collect(),
        });
    }
    for cvm in &state.cloud_vms {
        if running_on(cvm, name)? {
            return Ok(cvm);
        }
    }
    Err(LabError::GuestNotRunning(name.into()))
}

/// Host path of the guest's agent socket on `cvm`.
pub fn agent_socket(cvm: &CloudVm, name: &str) -> PathBuf {
    crate::cvm::host_path(cvm, &agent_socket_inner(name))
}

/// The name of the virtio-serial channel Nova gives a guest whose image has
/// `hw_qemu_guest_agent=yes`; the lab agent speaks QGA there when booted with
/// `vmbeam.chan=qga:org.qemu.guest_agent.0`, and is reached through libvirt.
pub const NOVA_AGENT_CHANNEL: &str = "org.qemu.guest_agent.0";

/// The cloud VM where a domain the lab did not create (one Nova booted, say) runs.
fn locate_foreign<'a>(state: &'a LabState, name: &str) -> Result<&'a CloudVm, LabError> {
    for cvm in &state.cloud_vms {
        if running_on(cvm, name)? {
            return Ok(cvm);
        }
    }
    // Neither a lab guest nor a running domain of any cloud VM: the name is unknown.
    Err(LabError::UnknownGuest {
        name: name.into(),
        known: state.guests.iter().map(|g| g.name.clone()).collect(),
    })
}

/// Connects to the agent of `name` wherever it runs now: a lab guest, or any running
/// domain of a cloud VM whose agent libvirt reaches on its guest-agent channel (a guest
/// Nova booted from the lab image).
pub fn agent(state: &LabState, name: &str) -> Result<(String, AgentClient), LabError> {
    if state.guest(name).is_none() {
        let cvm = locate_foreign(state, name)?;
        return Ok((cvm.name.clone(), AgentClient::via_libvirt(&cvm.uri, name)));
    }
    let cvm = locate(state, name)?;
    let c = AgentClient::connect(&agent_socket(cvm, name))?;
    Ok((cvm.name.clone(), c))
}

/// Checks the guest's memory integrity wherever it runs now.
pub fn check(name: &str) -> Result<(String, CheckResult), LabError> {
    let state = crate::require_state()?;
    let (on, mut c) = agent(&state, name)?;
    let mem = state.guest(name).map(|g| g.fill_mib).unwrap_or(256);
    // A full pass under TCG verifies roughly 200 MiB/s; allow plenty.
    let r = c.check(Duration::from_secs(30 + mem / 20))?;
    Ok((on, r))
}

/// Defines and boots a lab guest on a cloud VM and waits for its agent.
pub fn create(spec: &GuestSpec, image: &GuestImage) -> Result<GuestRecord, LabError> {
    let _lock = Lock::take()?;
    let mut state = crate::require_state()?;
    if !valid_name(&spec.name) {
        return Err(LabError::BadInput(format!(
            "invalid guest name '{}': use letters, digits, '-', '_' or '.' (at most 64)",
            spec.name
        )));
    }
    let cvm = state
        .cloud_vm(&spec.on)
        .cloned()
        .ok_or_else(|| LabError::UnknownCloudVm {
            name: spec.on.clone(),
            known: state.cloud_vms.iter().map(|c| c.name.clone()).collect(),
        })?;
    let fill = fill_for(spec.memory_mib, spec.fill_mib)?;
    if state.guest(&spec.name).is_some() {
        return Err(LabError::BadInput(format!(
            "a lab guest named '{}' exists already: pick another name or `vmbeam-lab guest destroy {}`",
            spec.name, spec.name
        )));
    }
    for c in &state.cloud_vms {
        let mut conn = connect(c)?;
        let exists = Domain::lookup_by_name(&conn, &spec.name).is_ok();
        let _ = conn.close();
        if exists {
            return Err(LabError::BadInput(format!(
                "a domain named '{}' exists on {} already",
                spec.name, c.name
            )));
        }
    }
    let accel = state
        .accel
        .clone()
        .ok_or_else(|| LabError::Setup("lab has no accelerator decision".into()))?;
    let n = (1..)
        .find(|n| !state.guests.iter().any(|g| g.ip == guest_ip(*n)))
        .expect("free guest number");
    let rec = GuestRecord {
        name: spec.name.clone(),
        uuid: random_uuid(),
        memory_mib: spec.memory_mib,
        fill_mib: fill,
        dirty_rate: spec.dirty_rate,
        vcpus: spec.vcpus.max(1),
        ip: guest_ip(n),
        mac: format!("52:54:00:be:{:02x}:{:02x}", n / 256, n % 256),
        created_on: cvm.name.clone(),
    };
    let mut xml = domain_xml(&rec, image, &accel.domain_type);
    if spec.beam {
        xml = beam_xml(&xml, &cvm)?;
    }
    // A console log left by an earlier guest of the same name would be appended to.
    let _ = std::fs::remove_file(crate::cvm::host_path(&cvm, &console_inner(&rec.name)));
    let conn = connect(&cvm)?;
    let dom = Domain::define_xml(&conn, &xml)
        .map_err(|e| LabError::Libvirt(format!("define {}: {e}", rec.name)))?;
    state.guests.push(rec.clone());
    state.save()?;
    let started = dom
        .create()
        .map_err(|e| LabError::Libvirt(format!("start {}: {e}", rec.name)));
    let ready = started.and_then(|_| {
        let timeout = Duration::from_secs(45 + 10 * fill / 1024);
        wait_booted(&cvm, &dom, &rec.name, timeout)
    });
    if let Err(e) = ready {
        let _ = dom.destroy();
        let _ = dom.undefine();
        state.guests.retain(|g| g.name != rec.name);
        state.save()?;
        return Err(e);
    }
    Ok(rec)
}

/// Waits for the agent to answer, failing early when the guest died or the agent gave up.
fn wait_booted(cvm: &CloudVm, dom: &Domain, name: &str, timeout: Duration) -> Result<(), LabError> {
    let console_path = crate::cvm::host_path(cvm, &console_inner(name));
    let deadline = std::time::Instant::now() + timeout;
    let fail = |detail: String| LabError::GuestBoot {
        name: name.into(),
        detail,
    };
    loop {
        match wait_ready(&agent_socket(cvm, name), Duration::from_secs(1)) {
            Ok(_) => return Ok(()),
            Err(e) => {
                let console = std::fs::read_to_string(&console_path).unwrap_or_default();
                if let Some(l) = console.lines().find(|l| l.contains("VMBEAM-AGENT FATAL")) {
                    return Err(fail(l.trim().to_string()));
                }
                if let Some(l) = console.lines().find(|l| l.contains("Kernel panic")) {
                    return Err(fail(format!("the guest kernel panicked: {}", l.trim())));
                }
                if !dom.is_active().unwrap_or(false) {
                    return Err(fail("the guest stopped during boot".into()));
                }
                if std::time::Instant::now() >= deadline {
                    let tail: Vec<&str> = console.lines().rev().take(3).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    return Err(fail(format!(
                        "{e} after {} s; console: {}",
                        timeout.as_secs(),
                        tail.join(" | ")
                    )));
                }
            }
        }
    }
}

/// Destroys and undefines a lab guest wherever it is defined, and forgets it.
pub fn destroy(name: &str) -> Result<Vec<String>, LabError> {
    let _lock = Lock::take()?;
    let mut state = crate::require_state()?;
    if state.guest(name).is_none() {
        return Err(LabError::UnknownGuest {
            name: name.into(),
            known: state.guests.iter().map(|g| g.name.clone()).collect(),
        });
    }
    let mut removed = Vec::new();
    for cvm in &state.cloud_vms {
        let mut conn = connect(cvm)?;
        if let Ok(d) = Domain::lookup_by_name(&conn, name) {
            if d.is_active().unwrap_or(false) {
                let _ = d.destroy();
            }
            let _ = d.undefine();
            removed.push(cvm.name.clone());
        }
        let _ = conn.close();
    }
    state.guests.retain(|g| g.name != name);
    state.save()?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(valid_name("web1"));
        assert!(valid_name("a.b-c_d"));
        assert!(!valid_name(""));
        assert!(!valid_name("../x"));
        assert!(!valid_name("a b"));
        assert!(!valid_name(".hidden"));
    }

    #[test]
    fn fill_leaves_room_for_the_kernel() {
        assert_eq!(fill_for(256, None).unwrap(), default_fill(256));
        assert_eq!(fill_for(256, Some(96)).unwrap(), 96);
        for (mem, fill) in [(128, None), (256, Some(0)), (256, Some(200))] {
            assert!(matches!(fill_for(mem, fill), Err(LabError::BadInput(_))));
        }
        assert_eq!(default_fill(2048), 1680);
        assert!(default_fill(256) < 162);
        assert!(default_fill(MIN_MEMORY_MIB) > 0);
    }

    #[test]
    fn uuid_is_v4_shaped() {
        let u = random_uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
    }
}
