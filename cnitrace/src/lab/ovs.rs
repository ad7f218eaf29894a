//! An Open vSwitch kernel datapath as a lab host's switch, with a VXLAN port to the other
//! host: the datapath under Antrea, OVN-Kubernetes and Weave's fast path. It is made and programmed with `ovs-dpctl` (Debian's
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

/// A pod's port on the datapath: its host-side device and the pod's MAC.
#[derive(Debug, Clone)]
pub struct PodPort {
    pub device: String,
    pub mac: [u8; 6],
}

/// The other host's end of the VXLAN tunnel and the pods behind it.
#[derive(Debug, Clone)]
pub struct Peer {
    pub remote: std::net::Ipv4Addr,
    pub macs: Vec<[u8; 6]>,
}

/// The VXLAN network identifier and UDP port of the tunnel between the datapaths.
const VNI: u32 = 1;
const VXLAN_PORT: u16 = 4789;
/// The device the kernel makes for a datapath's VXLAN port (one per UDP port).
pub const TUNNEL_DEVICE: &str = "vxlan_sys_4789";

fn mac(bytes: [u8; 6]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The flows of one host's datapath: pods' ports are 1..=n in order, the tunnel port n+1.
/// Frames are switched by destination MAC (the lab's pods have fixed ones), ARP broadcasts
/// flooded to every other port; frames for the other host's pods leave through the tunnel with
/// its VNI and address. Unnamed fields are wildcards: a handful of megaflows that never
/// expire.
pub fn flows(pods: &[PodPort], peer: &Peer) -> Vec<(String, String)> {
    const BROADCAST: [u8; 6] = [0xff; 6];
    let tunnel_port = pods.len() + 1;
    let tunnel = format!(
        "set(tunnel(tun_id={VNI:#x},dst={},ttl=64,tp_dst={VXLAN_PORT},flags(df|key))),{tunnel_port}",
        peer.remote
    );
    let mut flows = Vec::new();
    let mut add = |in_port: usize, dst: [u8; 6], actions: &[String]| {
        let protocols: &[&str] = if dst == BROADCAST {
            &["eth_type(0x0806),arp()"]
        } else {
            &["eth_type(0x0806),arp()", "eth_type(0x0800),ipv4()"]
        };
        for protocol in protocols {
            flows.push((
                format!("in_port({in_port}),eth(dst={}),{protocol}", mac(dst)),
                actions.join(","),
            ));
        }
    };
    let ports: Vec<(usize, [u8; 6])> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| (i + 1, p.mac))
        .collect();
    for &(from, _) in &ports {
        let others: Vec<String> = ports
            .iter()
            .filter(|(to, _)| *to != from)
            .map(|(to, _)| to.to_string())
            .collect();
        for &(to, dst) in ports.iter().filter(|(to, _)| *to != from) {
            add(from, dst, &[to.to_string()]);
        }
        for &dst in &peer.macs {
            add(from, dst, std::slice::from_ref(&tunnel));
        }
        let mut flood = others.clone();
        flood.push(tunnel.clone());
        add(from, BROADCAST, &flood);
    }
    for &(to, dst) in &ports {
        add(tunnel_port, dst, &[to.to_string()]);
    }
    let all: Vec<String> = ports.iter().map(|(to, _)| to.to_string()).collect();
    add(tunnel_port, BROADCAST, &all);
    flows
}

/// Makes the datapath in `host`: the pods' devices as ports 1..=n, a VXLAN port to the peer,
/// and [`flows`].
pub fn build(host: &str, pods: &[PodPort], peer: &Peer) -> Result<(), Error> {
    dpctl(host, &["add-dp", DATAPATH])?;
    for pod in pods {
        dpctl(host, &["add-if", DATAPATH, &pod.device])?;
    }
    // A flow-based VXLAN port (remote and key per packet, from the flows' set(tunnel())): the
    // kernel makes the device in collect-metadata mode, as for ovs-vswitchd.
    dpctl(
        host,
        &[
            "add-if",
            DATAPATH,
            &format!("vxlan0,type=vxlan,remote_ip=flow,key=flow,dst_port={VXLAN_PORT}"),
        ],
    )?;
    // Ports are numbered in the order they were added; check rather than assume.
    let show = dpctl(host, &["show", DATAPATH])?;
    let names = pods
        .iter()
        .map(|p| p.device.as_str())
        .chain([TUNNEL_DEVICE]);
    for (number, device) in names.enumerate() {
        let expected = format!("port {}: {device}", number + 1);
        if !show.contains(&expected) {
            return Err(Error::InvalidArgument(format!(
                "the datapath in {host} numbered its ports otherwise than expected ({expected}):\n{show}"
            )));
        }
    }
    for (flow, actions) in flows(pods, peer) {
        dpctl(host, &["add-flow", DATAPATH, &flow, &actions])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_switch_by_mac_and_tunnel_to_the_peer() {
        let pods = [
            PodPort {
                device: "vetha".into(),
                mac: [2, 0, 0, 0, 0, 0xa],
            },
            PodPort {
                device: "vethb".into(),
                mac: [2, 0, 0, 0, 0, 0xb],
            },
        ];
        let peer = Peer {
            remote: std::net::Ipv4Addr::new(192, 168, 77, 2),
            macs: vec![[2, 0, 0, 0, 0, 0xc]],
        };
        let flows = flows(&pods, &peer);
        let find = |flow: &str| {
            flows.iter().find(|(f, _)| f == flow).map_or_else(
                || panic!("no flow {flow} in {flows:?}"),
                |(_, a)| a.as_str(),
            )
        };
        assert_eq!(
            find("in_port(1),eth(dst=02:00:00:00:00:0b),eth_type(0x0800),ipv4()"),
            "2"
        );
        assert_eq!(
            find("in_port(2),eth(dst=02:00:00:00:00:0c),eth_type(0x0800),ipv4()"),
            "set(tunnel(tun_id=0x1,dst=192.168.77.2,ttl=64,tp_dst=4789,flags(df|key))),3"
        );
        assert_eq!(
            find("in_port(1),eth(dst=ff:ff:ff:ff:ff:ff),eth_type(0x0806),arp()"),
            "2,set(tunnel(tun_id=0x1,dst=192.168.77.2,ttl=64,tp_dst=4789,flags(df|key))),3"
        );
        assert_eq!(
            find("in_port(3),eth(dst=02:00:00:00:00:0a),eth_type(0x0806),arp()"),
            "1"
        );
        assert_eq!(
            find("in_port(3),eth(dst=ff:ff:ff:ff:ff:ff),eth_type(0x0806),arp()"),
            "1,2"
        );
        // Per pod port: 2 to the other pod, 2 to the remote pod, 1 flood; from the tunnel: 2
        // per pod and 1 flood.
        assert_eq!(flows.len(), 2 * 5 + 2 * 2 + 1);
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
