//! The lab's virtual networks: a hub namespace with two bridges, the cloud network
//! (198.18.0.0/24: cloud VMs' management and migration traffic, shaped per link) and the
//! guest network (198.19.0.0/16: guests and the load generator).
//!
//! ```text
//!  host ──vmbeam-h0/h0──┐                         ┌──g1── cvm1:gw0─[br0]─ guests
//!                       [vbr-cloud]  (vmbeam-hub) [vbr-guest]
//!  cvm1:eth0 ──c1───────┤                         ├──g2── cvm2:gw0─[br0]─ guests
//!  cvm2:eth0 ──c2───────┘                         └──l0── vmbeam-load:eth0
//! ```

use crate::state::{LabState, Resource, Shaping};
use crate::sys::{run, run_in_ns, SysError};
use crate::LabError;

/// Hub namespace holding the two bridges.
pub const HUB_NS: &str = "vmbeam-hub";
/// Load-generator namespace on the guest network.
pub const LOAD_NS: &str = "vmbeam-load";
/// Bridge of the cloud network (in the hub).
pub const CLOUD_BRIDGE: &str = "vbr-cloud";
/// Bridge of the guest network (in the hub).
pub const GUEST_BRIDGE: &str = "vbr-guest";
/// The host's link into the cloud network.
pub const HOST_LINK: &str = "vmbeam-h0";
/// The host's address on the cloud network.
pub const HOST_ADDR: &str = "198.18.0.1";
/// The load generator's address on the guest network.
pub const LOADGEN_ADDR: &str = "198.19.0.1";
/// The bridge inside each cloud VM that guests attach to.
pub const CVM_GUEST_BRIDGE: &str = "br0";

/// Name of cloud VM `i`'s network namespace.
pub fn cvm_netns(i: u32) -> String {
    format!("vmbeam-cvm{i}")
}

/// Address of cloud VM `i` on the cloud network.
pub fn cvm_addr(i: u32) -> String {
    format!("198.18.0.{}", 10 + i)
}

/// Address of lab guest number `n` (1-based) on the guest network.
pub fn guest_ip(n: u32) -> String {
    format!("198.19.{}.{}", 1 + n / 250, 1 + n % 250)
}

/// Whether a network namespace with this name exists.
pub fn netns_exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

fn add_netns(state: &mut LabState, name: &str) -> Result<(), LabError> {
    if netns_exists(name) {
        return Err(LabError::Conflict(format!(
            "network namespace {name} already exists but is not part of a recorded lab"
        )));
    }
    run("ip", &["netns", "add", name])?;
    state.record(Resource::Netns { name: name.into() })?;
    run("ip", &["-n", name, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Creates the hub, its bridges and the host's link into the cloud network.
pub fn create_hub(state: &mut LabState) -> Result<(), LabError> {
    add_netns(state, HUB_NS)?;
    for br in [CLOUD_BRIDGE, GUEST_BRIDGE] {
        run("ip", &["-n", HUB_NS, "link", "add", br, "type", "bridge"])?;
        run("ip", &["-n", HUB_NS, "link", "set", br, "up"])?;
    }
    if std::path::Path::new("/sys/class/net")
        .join(HOST_LINK)
        .exists()
    {
        return Err(LabError::Conflict(format!(
            "host link {HOST_LINK} already exists but is not part of a recorded lab"
        )));
    }
    run(
        "ip",
        &[
            "link", "add", HOST_LINK, "type", "veth", "peer", "name", "h0", "netns", HUB_NS,
        ],
    )?;
    state.record(Resource::HostLink {
        name: HOST_LINK.into(),
    })?;
    run(
        "ip",
        &[
            "-n",
            HUB_NS,
            "link",
            "set",
            "h0",
            "master",
            CLOUD_BRIDGE,
            "up",
        ],
    )?;
    run(
        "ip",
        &["addr", "add", &format!("{HOST_ADDR}/24"), "dev", HOST_LINK],
    )?;
    run("ip", &["link", "set", HOST_LINK, "up"])?;
    Ok(())
}

/// A veth pair from hub bridge `bridge` (hub end `hub_end`) into namespace `ns` (inner end
/// `inner`), both ends up; `addr` (CIDR) on the inner end if given.
fn veth_from_hub(
    ns: &str,
    hub_end: &str,
    bridge: &str,
    inner: &str,
    addr: Option<&str>,
) -> Result<(), LabError> {
    run(
        "ip",
        &[
            "-n", HUB_NS, "link", "add", hub_end, "type", "veth", "peer", "name", inner, "netns",
            ns,
        ],
    )?;
    run(
        "ip",
        &["-n", HUB_NS, "link", "set", hub_end, "master", bridge, "up"],
    )?;
    if let Some(a) = addr {
        run("ip", &["-n", ns, "addr", "add", a, "dev", inner])?;
    }
    run("ip", &["-n", ns, "link", "set", inner, "up"])?;
    Ok(())
}

/// Creates cloud VM `i`'s namespace, its cloud link (shaped) and its guest bridge.
pub fn create_cvm_net(state: &mut LabState, i: u32, shaping: Shaping) -> Result<String, LabError> {
    let ns = cvm_netns(i);
    add_netns(state, &ns)?;
    let addr = format!("{}/24", cvm_addr(i));
    veth_from_hub(&ns, &format!("c{i}"), CLOUD_BRIDGE, "eth0", Some(&addr))?;
    apply_shaping(&ns, "eth0", shaping)?;
    // The guest uplink: the cloud VM's own bridge, joined to the hub's guest network.
    run(
        "ip",
        &["-n", &ns, "link", "add", CVM_GUEST_BRIDGE, "type", "bridge"],
    )?;
    veth_from_hub(&ns, &format!("g{i}"), GUEST_BRIDGE, "gw0", None)?;
    run(
        "ip",
        &["-n", &ns, "link", "set", "gw0", "master", CVM_GUEST_BRIDGE],
    )?;
    run("ip", &["-n", &ns, "link", "set", CVM_GUEST_BRIDGE, "up"])?;
    Ok(ns)
}

/// Creates the load generator's namespace on the guest network.
pub fn create_loadgen(state: &mut LabState) -> Result<(), LabError> {
    add_netns(state, LOAD_NS)?;
    veth_from_hub(
        LOAD_NS,
        "l0",
        GUEST_BRIDGE,
        "eth0",
        Some(&format!("{LOADGEN_ADDR}/16")),
    )?;
    state.loadgen_netns = Some(LOAD_NS.into());
    state.save()?;
    Ok(())
}

/// Shapes the egress of `dev` in namespace `ns`: a token bucket at the bandwidth, and a
/// netem delay for the latency (netem needs the sch_netem module).
pub fn apply_shaping(ns: &str, dev: &str, shaping: Shaping) -> Result<(), LabError> {
    let _ = run_in_ns(ns, "tc", &["qdisc", "del", "dev", dev, "root"]);
    match (shaping.latency_ms, shaping.bandwidth_mbit) {
        (None, None) => Ok(()),
        (None, Some(rate)) => {
            run_in_ns(ns, "tc", &tbf_args(dev, "root", rate))?;
            Ok(())
        }
        (Some(lat), rate) => {
            let delay = format!("{lat}ms");
            run_in_ns(
                ns,
                "tc",
                &["qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", "delay", &delay],
            )
            .map_err(|e| match e {
                SysError::Failed { stderr, .. } if stderr.contains("unknown") => LabError::Unsupported(
                    "--latency needs the netem queueing discipline (kernel module sch_netem), which this kernel lacks; use --bandwidth alone".into(),
                ),
                other => other.into(),
            })?;
            if let Some(rate) = rate {
                run_in_ns(ns, "tc", &tbf_args(dev, "parent 1:1", rate))?;
            }
            Ok(())
        }
    }
}

fn tbf_args(dev: &str, parent: &str, rate_mbit: u32) -> Vec<String> {
    // A burst of 10 ms at the rate (at least 32 KiB) keeps a token bucket accurate on a veth.
    let burst = ((rate_mbit as u64 * 1_000_000 / 8) / 100).max(32 * 1024);
    let mut a: Vec<String> = vec!["qdisc".into(), "add".into(), "dev".into(), dev.into()];
    a.extend(parent.split_whitespace().map(String::from));
    a.extend([
        "tbf".to_string(),
        "rate".into(),
        format!("{rate_mbit}mbit"),
        "burst".into(),
        burst.to_string(),
        "latency".into(),
        "100ms".into(),
    ]);
    a
}

/// Bytes sent and received on `dev` in namespace `ns` (from /sys inside the namespace).
pub fn link_counters(ns: &str, dev: &str) -> Result<(u64, u64), LabError> {
    let out = run_in_ns(
        ns,
        "cat",
        &[
            format!("/sys/class/net/{dev}/statistics/tx_bytes"),
            format!("/sys/class/net/{dev}/statistics/rx_bytes"),
        ],
    )?;
    let mut it = out
        .split_whitespace()
        .map(|s| s.parse::<u64>().unwrap_or(0));
    Ok((it.next().unwrap_or(0), it.next().unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_in_the_benchmarking_range() {
        assert_eq!(cvm_addr(1), "198.18.0.11");
        assert_eq!(guest_ip(1), "198.19.1.2");
        assert_eq!(guest_ip(250), "198.19.2.1");
    }

    #[test]
    fn tbf_burst_is_at_least_32k() {
        let a = tbf_args("eth0", "root", 100);
        assert!(a.contains(&"100mbit".to_string()));
        let burst: u64 = a[a.iter().position(|x| x == "burst").unwrap() + 1]
            .parse()
            .unwrap();
        assert_eq!(burst, 125_000);
        let a = tbf_args("eth0", "parent 1:1", 1);
        assert!(a.contains(&"parent".to_string()));
        let burst: u64 = a[a.iter().position(|x| x == "burst").unwrap() + 1]
            .parse()
            .unwrap();
        assert_eq!(burst, 32 * 1024);
    }
}
