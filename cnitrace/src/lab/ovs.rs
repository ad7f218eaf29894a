//! An Open vSwitch kernel datapath as a lab host's switch: the datapath under Antrea,
//! OVN-Kubernetes and Weave's fast path. It is made and programmed with `ovs-dpctl` (Debian's
//! `openvswitch-switch`) directly in the kernel, without ovs-vswitchd: the flows are
//! installed once and never expire, so every packet takes the fast path (one flow-table
//! lookup, then the actions) and none goes up to user space.

use crate::{error::Error, netns};

/// The datapath's name (Antrea's and OVN's); its local port is a device of that name.
pub const DATAPATH: &str = "ovs-system";

const TOOL: &str = "ovs-dpctl";

/// Why the lab cannot make a datapath here, if it cannot: no `openvswitch` module, or no
/// `ovs-dpctl`.
pub fn unavailable_reason(has_module: bool) -> Option<String> {
    if !has_module {
        return Some(
            "unavailable on this kernel: no Open vSwitch datapath (module openvswitch absent, \
             CONFIG_OPENVSWITCH not set); `cargo xtask vmtest` measures it on Debian's kernels"
                .to_owned(),
        );
    }
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(TOOL).is_file()));
    (!found).then(|| format!("needs {TOOL} (apt install openvswitch-switch)"))
}

/// Runs `ovs-dpctl ARGS` in the host's namespace (a datapath belongs to the namespace that
/// made it and goes with it).
fn dpctl(host: &str, args: &[&str]) -> Result<String, Error> {
    match netns::output_in(Some(host), TOOL, args, None)? {
        Some(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        Some(out) => Err(Error::InvalidArgument(format!(
            "`{TOOL} {}` in {host} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
        None => Err(Error::InvalidArgument(format!(
            "{TOOL} is not installed (apt install openvswitch-switch)"
        ))),
    }
}

/// The flows that make a datapath with ports 1 and 2 a two-port switch: ARP and IPv4 from
/// each port out of the other (unnamed fields are wildcards: one megaflow per direction and
/// protocol).
pub fn flows() -> Vec<(String, String)> {
    let mut flows = Vec::new();
    for (from, to) in [(1, 2), (2, 1)] {
        for protocol in ["eth_type(0x0806),arp()", "eth_type(0x0800),ipv4()"] {
            flows.push((format!("in_port({from}),eth(),{protocol}"), to.to_string()));
        }
    }
    flows
}

/// Makes the datapath in `host` with the pods' host-side devices as ports 1 and 2, and
/// installs [`flows`].
pub fn build(host: &str, ports: [&str; 2]) -> Result<(), Error> {
    dpctl(host, &["add-dp", DATAPATH])?;
    for port in ports {
        dpctl(host, &["add-if", DATAPATH, port])?;
    }
    // Ports are numbered in the order they were added; check rather than assume.
    let show = dpctl(host, &["show", DATAPATH])?;
    for (number, port) in ports.iter().enumerate() {
        let expected = format!("port {}: {port}", number + 1);
        if !show.contains(&expected) {
            return Err(Error::InvalidArgument(format!(
                "the datapath numbered its ports otherwise than expected ({expected}):\n{show}"
            )));
        }
    }
    for (flow, actions) in flows() {
        dpctl(host, &["add-flow", DATAPATH, &flow, &actions])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_ports_four_flows() {
        let flows = flows();
        assert_eq!(flows.len(), 4);
        assert!(flows.contains(&(
            "in_port(1),eth(),eth_type(0x0800),ipv4()".to_owned(),
            "2".to_owned()
        )));
        assert!(flows.contains(&(
            "in_port(2),eth(),eth_type(0x0806),arp()".to_owned(),
            "1".to_owned()
        )));
    }

    #[test]
    fn a_kernel_without_the_module_is_told() {
        let reason = unavailable_reason(false).unwrap();
        assert!(
            reason.contains("openvswitch") && reason.contains("vmtest"),
            "{reason}"
        );
    }
}
