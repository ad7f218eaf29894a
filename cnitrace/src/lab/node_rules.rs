//! The iptables rules a Kubernetes node of each CNI carries before anyone writes a
//! NetworkPolicy: kubelet's, kube-proxy's for the Services every cluster has (the API server
//! and cluster DNS), and the CNI's own chains (flannel's FLANNEL-*, Calico's cali-*,
//! kube-router's KUBE-ROUTER-* and per-pod firewall chains, Weave's WEAVE-*; Cilium replaces
//! kube-proxy and keeps one rule). Installed by `lab up` with one iptables-restore per host.

use std::{fmt::Write as _, net::Ipv4Addr};

use super::{
    services::{self, Service},
    topology::Model,
};
use crate::{error::Error, netns};

/// The Services of an empty cluster: the API server (one endpoint) and cluster DNS (two
/// CoreDNS pods, three ports). They come first in KUBE-SERVICES.
pub fn default_services(dns: [Ipv4Addr; 2]) -> Vec<Service> {
    let mut list = vec![Service {
        name: "default/kubernetes:https".to_owned(),
        ip: Ipv4Addr::new(10, 96, 255, 1),
        protocol: "tcp",
        port: 443,
        endpoints: vec![(Ipv4Addr::new(192, 168, 77, 1), 6443)],
    }];
    for (port_name, protocol, port) in [
        ("dns", "udp", 53),
        ("dns-tcp", "tcp", 53),
        ("metrics", "tcp", 9153),
    ] {
        list.push(Service {
            name: format!("kube-system/kube-dns:{port_name}"),
            ip: Ipv4Addr::new(10, 96, 255, 10),
            protocol,
            port,
            endpoints: vec![(dns[0], port), (dns[1], port)],
        });
    }
    list
}

/// Whether the model's CNI replaces kube-proxy (no KUBE-* Service rules on its nodes).
pub fn replaces_kube_proxy(model: Model) -> bool {
    model == Model::Cilium
}

/// kubelet's own rules.
const KUBELET: &str = "*filter
:KUBE-FIREWALL - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
-A INPUT -j KUBE-FIREWALL
-A OUTPUT -j KUBE-FIREWALL
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"block incoming localnet connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
COMMIT
";

/// flanneld's masquerade and forward rules for a host whose pods are `pod_cidr`.
fn flannel(pod_cidr: &str) -> String {
    let mut out = String::from("*nat\n:FLANNEL-POSTRTG - [0:0]\n");
    out.push_str("-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n");
    for rule in [
        "-m mark --mark 0x4000/0x4000 -j RETURN".to_owned(),
        format!("-s {pod_cidr} -d 10.77.0.0/16 -j RETURN"),
        format!("-s 10.77.0.0/16 -d {pod_cidr} -j RETURN"),
        format!("! -s 10.77.0.0/16 -d {pod_cidr} -j RETURN"),
        "-s 10.77.0.0/16 ! -d 224.0.0.0/4 -j MASQUERADE --random-fully".to_owned(),
        "! -s 10.77.0.0/16 -d 10.77.0.0/16 -j MASQUERADE --random-fully".to_owned(),
    ] {
        let _ = writeln!(
            out,
            "-A FLANNEL-POSTRTG -m comment --comment \"flanneld masq\" {rule}"
        );
    }
    out.push_str(
        "COMMIT\n*filter\n:FLANNEL-FWD - [0:0]\n\
         -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
         -A FLANNEL-FWD -s 10.77.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
         -A FLANNEL-FWD -d 10.77.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
         COMMIT\n",
    );
    out
}

/// Calico's felix chains outside the filter table's forwarding path (raw, mangle, nat, and
/// filter INPUT/OUTPUT); the forwarding path is [`super::policy::calico_ruleset`].
fn calico_host(pod_cidr: &str) -> String {
    format!(
        "*raw
:cali-PREROUTING - [0:0]
:cali-OUTPUT - [0:0]
:cali-rpf-skip - [0:0]
:cali-from-host-endpoint - [0:0]
:cali-to-host-endpoint - [0:0]
-A PREROUTING -m comment --comment \"cali:6gwbT8clXdHdC1b1\" -j cali-PREROUTING
-A OUTPUT -m comment --comment \"cali:tVnHkvAo15HuiPy0\" -j cali-OUTPUT
-A cali-PREROUTING -m comment --comment \"cali:XFX5xbM8B9qR10JG\" -j MARK --set-xmark 0x0/0xf0000
-A cali-PREROUTING -i cali+ -m comment --comment \"cali:EWMPb0zVROM-woQp\" -j MARK --set-xmark 0x40000/0x40000
-A cali-PREROUTING -m comment --comment \"cali:PWuxTAIaFCtsg5Qa\" -m mark --mark 0x40000/0x40000 -j cali-rpf-skip
-A cali-PREROUTING -m comment --comment \"cali:fSSbGND7dgyemWU7\" -m mark --mark 0x40000/0x40000 -m rpfilter --validmark --invert -j DROP
-A cali-PREROUTING -m comment --comment \"cali:ImU0-4Rl2WoOI9Ou\" -m mark --mark 0x0/0x40000 -j cali-from-host-endpoint
-A cali-PREROUTING -m comment --comment \"cali:lV4V2MPoMBf0hl9T\" -m mark --mark 0x10000/0x10000 -j ACCEPT
-A cali-OUTPUT -m comment --comment \"cali:njdnLwYeGqBJyh3Z\" -j MARK --set-xmark 0x0/0xf0000
-A cali-OUTPUT -m comment --comment \"cali:rz86uTUcEZAfFsh7\" -j cali-to-host-endpoint
-A cali-OUTPUT -m comment --comment \"cali:pN0F5zD0b8yf9W1Z\" -m mark --mark 0x10000/0x10000 -j ACCEPT
COMMIT
*mangle
:cali-PREROUTING - [0:0]
:cali-POSTROUTING - [0:0]
:cali-from-host-endpoint - [0:0]
:cali-to-host-endpoint - [0:0]
-A PREROUTING -m comment --comment \"cali:6gwbT8clXdHdC1b1\" -j cali-PREROUTING
-A POSTROUTING -m comment --comment \"cali:O3lYWMrLQYEMJtB5\" -j cali-POSTROUTING
-A cali-PREROUTING -m comment --comment \"cali:6BJqBjBC7crtA-7-\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A cali-PREROUTING -m comment --comment \"cali:KX7AGNd6rMcDUai6\" -m mark --mark 0x10000/0x10000 -j ACCEPT
-A cali-PREROUTING -m comment --comment \"cali:wNH7KsA3ILKJBsY9\" -j cali-from-host-endpoint
-A cali-PREROUTING -m comment --comment \"cali:Cg96MgVuoPm7UMRo\" -m comment --comment \"Host endpoint policy accepted packet.\" -m mark --mark 0x10000/0x10000 -j ACCEPT
-A cali-POSTROUTING -m comment --comment \"cali:EBGJbbWjXYNXJTsR\" -m mark --mark 0x10000/0x10000 -j RETURN
-A cali-POSTROUTING -m comment --comment \"cali:NIZGhQ3i2oEeEnkE\" -j MARK --set-xmark 0x0/0xf0000
-A cali-POSTROUTING -m comment --comment \"cali:VwCz4FdQzrZI7r13\" -m conntrack --ctstate DNAT -j cali-to-host-endpoint
-A cali-POSTROUTING -m comment --comment \"cali:ZMJ2vqoGDFk5cPUS\" -m comment --comment \"Host endpoint policy accepted packet.\" -m mark --mark 0x10000/0x10000 -j RETURN
COMMIT
*nat
:cali-PREROUTING - [0:0]
:cali-POSTROUTING - [0:0]
:cali-OUTPUT - [0:0]
:cali-fip-dnat - [0:0]
:cali-fip-snat - [0:0]
:cali-nat-outgoing - [0:0]
-A PREROUTING -m comment --comment \"cali:6gwbT8clXdHdC1b1\" -j cali-PREROUTING
-A OUTPUT -m comment --comment \"cali:tVnHkvAo15HuiPy0\" -j cali-OUTPUT
-A POSTROUTING -m comment --comment \"cali:O3lYWMrLQYEMJtB5\" -j cali-POSTROUTING
-A cali-PREROUTING -m comment --comment \"cali:r6XmIziWUJsdOK6Z\" -j cali-fip-dnat
-A cali-OUTPUT -m comment --comment \"cali:GBTAv2p5CwevEyJm\" -j cali-fip-dnat
-A cali-POSTROUTING -m comment --comment \"cali:Z-c7XtVd2Bq7s_hA\" -j cali-fip-snat
-A cali-POSTROUTING -m comment --comment \"cali:nYKhEzDlr11Jccal\" -j cali-nat-outgoing
-A cali-nat-outgoing -s {pod_cidr} -m comment --comment \"cali:flqWnvo8yq4ULQLa\" ! -d 10.77.0.0/16 -j MASQUERADE --random-fully
COMMIT
*filter
:cali-INPUT - [0:0]
:cali-OUTPUT - [0:0]
:cali-wl-to-host - [0:0]
:cali-from-host-endpoint - [0:0]
:cali-to-host-endpoint - [0:0]
-A INPUT -m comment --comment \"cali:Cz_u1IQiXIMmKD4c\" -j cali-INPUT
-A OUTPUT -m comment --comment \"cali:tVnHkvAo15HuiPy0\" -j cali-OUTPUT
-A cali-INPUT -m comment --comment \"cali:msRIDfJRWnYwzW4g\" -m mark --mark 0x10000/0x10000 -j ACCEPT
-A cali-INPUT -i cali+ -m comment --comment \"cali:y4fKWmWkTnYGshVX\" -g cali-wl-to-host
-A cali-INPUT -m comment --comment \"cali:JnMb-hdLugWL4jEZ\" -j MARK --set-xmark 0x0/0xf0000
-A cali-INPUT -m comment --comment \"cali:NPKZwKxJ-5imzORj\" -j cali-from-host-endpoint
-A cali-INPUT -m comment --comment \"cali:aes7S4xZI-7Jyw63\" -m mark --mark 0x10000/0x10000 -j ACCEPT
-A cali-OUTPUT -m comment --comment \"cali:Mq1_rAdXXH3YkrzW\" -m mark --mark 0x10000/0x10000 -j ACCEPT
-A cali-OUTPUT -o cali+ -m comment --comment \"cali:69FkRTJDvD5Vu6Vl\" -j RETURN
-A cali-OUTPUT -m comment --comment \"cali:Nk55_l4LSKYB2Xl7\" -j MARK --set-xmark 0x0/0xf0000
-A cali-OUTPUT -m comment --comment \"cali:5Z67OUUpTOM7Xa1a\" -m conntrack ! --ctstate DNAT -j cali-to-host-endpoint
-A cali-OUTPUT -m comment --comment \"cali:M2Wf0OehNdig8MHR\" -m mark --mark 0x10000/0x10000 -j ACCEPT
-A cali-wl-to-host -m comment --comment \"cali:Ee9Sbo10IpVujdIY\" -j cali-from-wl-dispatch
-A cali-wl-to-host -m comment --comment \"cali:nSZbcOoG1xPONxb8\" -m comment --comment \"Configured DefaultEndpointToHostAction\" -j ACCEPT
COMMIT
"
    )
}

/// kube-router's firewall: its base chains and a firewall chain per local pod.
fn kube_router(pods: &[Ipv4Addr]) -> String {
    let mut out = String::from(
        "*filter\n:KUBE-ROUTER-FORWARD - [0:0]\n:KUBE-ROUTER-INPUT - [0:0]\n:KUBE-ROUTER-OUTPUT - [0:0]\n:KUBE-NWPLCY-DEFAULT - [0:0]\n",
    );
    let chain = |pod: &Ipv4Addr| format!("KUBE-POD-FW-{}", &services::chain_hash(&pod.to_string()));
    for pod in pods {
        let _ = writeln!(out, ":{} - [0:0]", chain(pod));
    }
    out.push_str(
        "-A INPUT -m comment --comment \"kube-router netpol - 4IA2OSFRMVNDXBVV\" -j KUBE-ROUTER-INPUT\n\
         -A FORWARD -m comment --comment \"kube-router netpol - TEMCG2JMHZYE7H7T\" -j KUBE-ROUTER-FORWARD\n\
         -A OUTPUT -m comment --comment \"kube-router netpol - VEAAIY32XVBHCSCY\" -j KUBE-ROUTER-OUTPUT\n\
         -A KUBE-NWPLCY-DEFAULT -m comment --comment \"rule to mark traffic matching a network policy\" -j MARK --set-xmark 0x10000/0x10000\n\
         -A KUBE-ROUTER-INPUT -d 10.96.0.0/12 -m comment --comment \"allow traffic to primary/secondary cluster IP range - TZZOAXOCHPHEHX7O\" -j RETURN\n\
         -A KUBE-ROUTER-INPUT -p tcp -m comment --comment \"allow LOCAL TCP traffic to node ports - LR7XO7NXDBGQJD2M\" -m addrtype --dst-type LOCAL -m multiport --dports 30000:32767 -j RETURN\n\
         -A KUBE-ROUTER-INPUT -p udp -m comment --comment \"allow LOCAL UDP traffic to node ports - 76UCBPIZNGJNWNUZ\" -m addrtype --dst-type LOCAL -m multiport --dports 30000:32767 -j RETURN\n",
    );
    for pod in pods {
        let fw = chain(pod);
        for rule in [
            format!(
                "-A KUBE-ROUTER-FORWARD -d {pod}/32 -m comment --comment \"rule to jump traffic destined to POD to chain {fw}\" -j {fw}"
            ),
            format!(
                "-A KUBE-ROUTER-FORWARD -s {pod}/32 -m comment --comment \"rule to jump traffic from POD to chain {fw}\" -j {fw}"
            ),
            format!(
                "-A KUBE-ROUTER-FORWARD -m physdev --physdev-is-bridged -d {pod}/32 -m comment --comment \"rule to jump bridged traffic destined to POD to chain {fw}\" -j {fw}"
            ),
            format!(
                "-A KUBE-ROUTER-FORWARD -m physdev --physdev-is-bridged -s {pod}/32 -m comment --comment \"rule to jump bridged traffic from POD to chain {fw}\" -j {fw}"
            ),
            format!(
                "-A KUBE-ROUTER-INPUT -s {pod}/32 -m comment --comment \"rule to jump traffic from POD to chain {fw}\" -j {fw}"
            ),
            format!(
                "-A KUBE-ROUTER-OUTPUT -d {pod}/32 -m comment --comment \"rule to jump traffic destined to POD to chain {fw}\" -j {fw}"
            ),
            format!(
                "-A {fw} -m comment --comment \"rule for stateful firewall for pod\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
            ),
            format!(
                "-A {fw} -m comment --comment \"rule to drop invalid state for pod\" -m conntrack --ctstate INVALID -j DROP"
            ),
            format!(
                "-A {fw} -d {pod}/32 -m addrtype --src-type LOCAL -m comment --comment \"rule to permit the traffic to pods when source is the pod's local node\" -j ACCEPT"
            ),
            format!(
                "-A {fw} -s {pod}/32 -m comment --comment \"run through default egress network policy chain\" -j KUBE-NWPLCY-DEFAULT"
            ),
            format!(
                "-A {fw} -d {pod}/32 -m comment --comment \"run through default ingress network policy chain\" -j KUBE-NWPLCY-DEFAULT"
            ),
            format!(
                "-A {fw} -m comment --comment \"rule to log dropped traffic POD name:{pod}\" -m mark ! --mark 0x10000/0x10000 -m limit --limit 10/min --limit-burst 10 -j NFLOG --nflog-group 100"
            ),
            format!(
                "-A {fw} -m comment --comment \"rule to REJECT traffic destined for POD name:{pod}\" -m mark ! --mark 0x10000/0x10000 -j REJECT --reject-with icmp-port-unreachable"
            ),
            format!("-A {fw} -j MARK --set-xmark 0x0/0x10000"),
            format!(
                "-A {fw} -m comment --comment \"set mark to ACCEPT traffic that comply to network policies\" -j MARK --set-xmark 0x20000/0x20000"
            ),
        ] {
            let _ = writeln!(out, "{rule}");
        }
    }
    out.push_str(
        "-A KUBE-ROUTER-FORWARD -m comment --comment \"rule to explicitly ACCEPT traffic that comply to network policies\" -m mark --mark 0x20000/0x20000 -j ACCEPT\n\
         -A KUBE-ROUTER-OUTPUT -m comment --comment \"rule to explicitly ACCEPT traffic that comply to network policies\" -m mark --mark 0x20000/0x20000 -j ACCEPT\n\
         -A KUBE-ROUTER-INPUT -m comment --comment \"rule to explicitly ACCEPT traffic that comply to network policies\" -m mark --mark 0x20000/0x20000 -j ACCEPT\n\
         COMMIT\n*nat\n:KUBE-ROUTER-POSTROUTING - [0:0]\n\
         -A POSTROUTING -m comment --comment \"kube-router masquerade\" -j KUBE-ROUTER-POSTROUTING\n\
         -A KUBE-ROUTER-POSTROUTING -s 10.77.0.0/16 ! -d 10.77.0.0/16 -j MASQUERADE --random-fully\n\
         COMMIT\n",
    );
    out
}

/// Weave's network policy controller and masquerade chains.
const WEAVE: &str = "*filter
:WEAVE-NPC - [0:0]
:WEAVE-NPC-DEFAULT - [0:0]
:WEAVE-NPC-INGRESS - [0:0]
:WEAVE-NPC-EGRESS - [0:0]
:WEAVE-NPC-EGRESS-DEFAULT - [0:0]
:WEAVE-FORWARD - [0:0]
-A FORWARD -m comment --comment \"NOTE: this must go before '-j KUBE-FORWARD'\" -j WEAVE-FORWARD
-A WEAVE-FORWARD -i weave -o weave -m comment --comment \"NOTE: this must go before '-j KUBE-FORWARD'\" -j WEAVE-NPC
-A WEAVE-FORWARD -o weave -m state --state NEW -j NFLOG --nflog-group 86
-A WEAVE-FORWARD -o weave -j DROP
-A WEAVE-FORWARD -i weave ! -o weave -j ACCEPT
-A WEAVE-FORWARD -o weave -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A WEAVE-NPC -m state --state RELATED,ESTABLISHED -j ACCEPT
-A WEAVE-NPC -d 224.0.0.0/4 -j ACCEPT
-A WEAVE-NPC -m physdev --physdev-out vethwe-bridge --physdev-is-bridged -j ACCEPT
-A WEAVE-NPC -m state --state NEW -j WEAVE-NPC-DEFAULT
-A WEAVE-NPC -m state --state NEW -j WEAVE-NPC-INGRESS
-A WEAVE-NPC-DEFAULT -m comment --comment \"DefaultAllow ingress isolation for namespace: default\" -j ACCEPT
-A WEAVE-NPC-EGRESS -m state --state RELATED,ESTABLISHED -j ACCEPT
-A WEAVE-NPC-EGRESS -m state --state NEW -j WEAVE-NPC-EGRESS-DEFAULT
-A WEAVE-NPC-EGRESS-DEFAULT -m comment --comment \"DefaultAllow egress isolation for namespace: default\" -j RETURN
COMMIT
*nat
:WEAVE - [0:0]
-A POSTROUTING -j WEAVE
-A WEAVE -o weave -m comment --comment \"Prevent SNAT to locally running containers\" -j RETURN
-A WEAVE -s 10.77.0.0/16 -d 224.0.0.0/4 -j RETURN
-A WEAVE ! -s 10.77.0.0/16 -d 10.77.0.0/16 -j MASQUERADE
-A WEAVE -s 10.77.0.0/16 ! -d 10.77.0.0/16 -j MASQUERADE
COMMIT
";

/// Cilium with kube-proxy replacement: one rule left in iptables.
const CILIUM: &str = "*filter
:CILIUM_FORWARD - [0:0]
-A FORWARD -m comment --comment \"cilium-feeder: CILIUM_FORWARD\" -j CILIUM_FORWARD
COMMIT
";

/// The iptables-restore input (`--noflush`) of a node of `model` hosting `pods` in
/// `pod_cidr`, kube-proxy's Services included unless the CNI replaces it. Calico's forwarding
/// path and policy are installed by the model itself.
pub fn ruleset(model: Model, pod_cidr: &str, pods: &[Ipv4Addr], dns: [Ipv4Addr; 2]) -> String {
    // The CNI's jumps come first in the base chains, as CNIs insert them.
    let mut out = match model {
        Model::Flannel => flannel(pod_cidr),
        Model::CalicoNp | Model::CalicoWp | Model::CalicoIpip => calico_host(pod_cidr),
        Model::KubeRouter => kube_router(pods),
        Model::Weave => WEAVE.to_owned(),
        Model::Cilium => CILIUM.to_owned(),
        // Antrea and OVN keep their policy in OVS flows; the node keeps kube-proxy's rules.
        Model::Ovs => String::new(),
        // The plugins install their own rules; the lab adds none.
        Model::CniBridge
        | Model::CniPtp
        | Model::CniMacvlan
        | Model::CniIpvlan
        | Model::CniBandwidth
        | Model::CniConf => {
            return String::new();
        }
    };
    if !replaces_kube_proxy(model) {
        out.push_str(KUBELET);
        out.push_str(&services::iptables_rules(&default_services(dns)));
    }
    out
}

/// Installs the node rules on a lab host.
pub fn install(host_netns: &str, rules: &str) -> Result<(), Error> {
    super::load_rules(
        host_netns,
        "iptables-restore",
        &["--noflush"],
        rules,
        "the node's rules",
    )
}

/// Rules (`-A` lines of iptables-save, every table) in a host namespace: how rules on a node
/// are counted.
pub fn count(host_netns: &str) -> Result<usize, Error> {
    let out = netns::output_in(Some(host_netns), "iptables-save", &[], None)?
        .ok_or_else(|| Error::InvalidArgument("the lab needs iptables-save".to_owned()))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("-A "))
        .count())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules_of(text: &str) -> usize {
        text.lines().filter(|l| l.starts_with("-A ")).count()
    }

    fn host1(model: Model) -> String {
        let pods = [Ipv4Addr::new(10, 77, 1, 2), Ipv4Addr::new(10, 77, 1, 3)];
        ruleset(
            model,
            "10.77.1.0/24",
            &pods,
            [pods[1], Ipv4Addr::new(10, 77, 2, 2)],
        )
    }

    #[test]
    fn every_block_is_committed_and_declares_its_chains() {
        const BUILTIN: &[&str] = &["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];
        for model in Model::ALL {
            let text = host1(model);
            let mut declared: Vec<&str> = Vec::new();
            let mut open = false;
            for line in text.lines() {
                if line.starts_with('*') {
                    assert!(!open, "{}: block not committed", model.name());
                    open = true;
                    declared.clear();
                } else if line == "COMMIT" {
                    open = false;
                } else if let Some(chain) = line.strip_prefix(':') {
                    declared.push(chain.split_whitespace().next().unwrap());
                } else if let Some(rule) = line.strip_prefix("-A ") {
                    let chain = rule.split_whitespace().next().unwrap();
                    assert!(
                        BUILTIN.contains(&chain) || declared.contains(&chain),
                        "{}: {chain} used undeclared",
                        model.name()
                    );
                }
            }
            assert!(!open, "{}: last block not committed", model.name());
        }
    }

    #[test]
    fn cilium_keeps_one_rule_and_no_kube_proxy() {
        let text = host1(Model::Cilium);
        assert_eq!(rules_of(&text), 1);
        assert!(!text.contains("KUBE-SERVICES"));
        assert!(host1(Model::Flannel).contains("KUBE-SERVICES"));
    }
}
