//! THE taxonomy: which kernel functions make up each datapath component.
//!
//! Every backend (sampling today, tracing later) classifies kernel functions through this one
//! table, so a component means the same thing whichever way it was measured.

/// How a rule matches a kernel function name (after dropping `.cold`, `.isra.0`, ... suffixes).
#[derive(Debug, Clone, Copy)]
pub enum Pattern {
    Exact(&'static str),
    Prefix(&'static str),
    /// A JITed BPF program: `bpf_prog_<16 hex digit tag>_<name>` (not kernel functions such as
    /// `bpf_prog_load`).
    JitImage,
}

impl Pattern {
    fn matches(self, name: &str) -> bool {
        match self {
            Pattern::Exact(exact) => name == exact,
            Pattern::Prefix(prefix) => name.starts_with(prefix),
            Pattern::JitImage => jit_image_name(name).is_some(),
        }
    }
}

/// One top-level component of the public contract (`contract::Breakdown::components`).
#[derive(Debug)]
pub struct Component {
    pub name: &'static str,
    pub description: &'static str,
    /// Functions whose presence in /proc/kallsyms shows this component's code is in the kernel.
    /// Empty for components that are always present (`other`, `bpf`).
    pub anchors: &'static [&'static str],
    /// What to do when the anchors are missing.
    pub missing_hint: &'static str,
    /// The colour of this component in every chart (lab SVG, live page).
    pub colour: &'static str,
    /// The entry points the tracing backend attaches to (exclusive time per component).
    pub traced: &'static [&'static str],
}

pub const OTHER: &str = "other";
/// Sub-component of `other` for cnitrace's own in-datapath programs, so the profiler's cost is
/// visible and never inflates `bpf`.
pub const SELF_COST: &str = "other.cnitrace";
pub const OTHER_USER: &str = "other.user";
pub const OTHER_KERNEL: &str = "other.kernel";

/// The top-level components, in the order they are reported.
pub const COMPONENTS: &[Component] = &[
    Component {
        name: "bridge",
        description: "Linux bridge forwarding (br_handle_frame, br_forward, br_dev_xmit)",
        anchors: &["br_forward", "br_handle_frame"],
        colour: "#4e79a7",
        traced: &["br_handle_frame", "br_forward", "br_dev_xmit"],
        missing_hint: "the bridge module is not loaded (CONFIG_BRIDGE)",
    },
    Component {
        name: "ip_forward",
        description: "IP forwarding and FIB lookups (ip_forward, fib_table_lookup, ip_route_input)",
        anchors: &["ip_forward", "fib_table_lookup"],
        colour: "#f28e2b",
        traced: &["ip_forward", "fib_table_lookup"],
        missing_hint: "IPv4 forwarding code is absent",
    },
    Component {
        name: "netfilter",
        description: "netfilter hooks, rule evaluation, conntrack, NAT, bridge-netfilter glue",
        anchors: &["nf_hook_slow"],
        colour: "#e15759",
        traced: &["nf_hook_slow"],
        missing_hint: "netfilter is not built in (CONFIG_NETFILTER)",
    },
    Component {
        name: "vxlan",
        description: "VXLAN encapsulation and decapsulation (vxlan_xmit, vxlan_rcv)",
        anchors: &["vxlan_xmit", "vxlan_rcv"],
        colour: "#76b7b2",
        traced: &["vxlan_xmit", "vxlan_rcv"],
        missing_hint: "the vxlan module is not loaded (CONFIG_VXLAN); it loads when a vxlan device is created",
    },
    Component {
        name: "ipip",
        description: "IP-in-IP tunnels (ipip_tunnel_xmit, ipip_rcv, ip_tunnel_*)",
        anchors: &["ipip_tunnel_xmit", "ipip_rcv"],
        colour: "#59a14f",
        traced: &["ipip_tunnel_xmit", "ipip_rcv"],
        missing_hint: "the ipip module is not loaded or not built (CONFIG_NET_IPIP)",
    },
    Component {
        name: "bpf",
        description: "eBPF programs on the datapath (JITed bpf_prog_* images and their helpers)",
        anchors: &[],
        colour: "#edc948",
        traced: &[],
        missing_hint: "",
    },
    Component {
        name: "veth",
        description: "virtual ethernet pairs (veth_xmit, veth_poll)",
        anchors: &["veth_xmit"],
        colour: "#b07aa1",
        traced: &["veth_xmit", "veth_poll"],
        missing_hint: "the veth module is not loaded (CONFIG_VETH)",
    },
    Component {
        name: "ovs",
        description: "Open vSwitch kernel datapath (ovs_dp_process_packet, ovs_execute_actions)",
        anchors: &["ovs_dp_process_packet", "ovs_vport_receive"],
        colour: "#ff9da7",
        traced: &["ovs_dp_process_packet", "ovs_vport_receive"],
        missing_hint: "the openvswitch module is not loaded or not built (CONFIG_OPENVSWITCH)",
    },
    Component {
        name: "tunnel_offload",
        description: "in-kernel segmentation and checksums a NIC could offload (skb_segment, ip_send_check, skb_checksum_help)",
        anchors: &["skb_segment"],
        colour: "#9c755f",
        traced: &["skb_segment", "skb_checksum_help"],
        missing_hint: "GSO code is absent",
    },
    Component {
        name: OTHER,
        description: "every other busy cycle: the endpoints' TCP/IP stacks, user space, scheduler, cnitrace itself",
        anchors: &[],
        colour: "#bab0ac",
        traced: &[],
        missing_hint: "",
    },
];

/// The colour of a component, or of `other` for anything not in the taxonomy.
pub fn colour(name: &str) -> &'static str {
    let base = name.split('.').next().unwrap_or(name);
    COMPONENTS
        .iter()
        .find(|c| c.name == base)
        .or_else(|| COMPONENTS.iter().find(|c| c.name == OTHER))
        .map_or("#bab0ac", |c| c.colour)
}

/// Every (function, component) the tracing backend attaches to, in taxonomy order.
pub fn traced_functions() -> impl Iterator<Item = (&'static str, &'static str)> {
    COMPONENTS
        .iter()
        .flat_map(|c| c.traced.iter().map(move |f| (*f, c.name)))
}

/// Components whose code is absent from this kernel, with the reason.
pub fn unavailable(kallsyms: &crate::kallsyms::Kallsyms) -> Vec<crate::contract::Unavailable> {
    let present: std::collections::HashSet<&str> = kallsyms.names().map(base_name).collect();
    COMPONENTS
        .iter()
        .filter_map(|c| {
            unavailable_reason(c, |s| present.contains(s)).map(|reason| {
                crate::contract::Unavailable {
                    name: c.name.to_owned(),
                    reason,
                }
            })
        })
        .collect()
}

/// Ordered rules: the first rule that matches a function decides its (sub-)component.
/// Specific rules come before the broader prefixes they overlap with.
const RULES: &[(Pattern, &str)] = &[
    // bridge-netfilter glue is netfilter work even though it is called br_nf_*.
    (Pattern::Prefix("br_nf_"), "netfilter.bridge"),
    (Pattern::Prefix("nf_bridge_"), "netfilter.bridge"),
    (Pattern::Prefix("br_"), "bridge"),
    (Pattern::Prefix("__br_"), "bridge"),
    (Pattern::Prefix("nbp_"), "bridge"),
    // IP forwarding and the FIB.
    (Pattern::Prefix("ip_forward"), "ip_forward.forward"),
    (Pattern::Prefix("fib_"), "ip_forward.fib"),
    (Pattern::Prefix("__fib_"), "ip_forward.fib"),
    (Pattern::Prefix("fib4_"), "ip_forward.fib"),
    (Pattern::Prefix("ip_route_input"), "ip_forward.fib"),
    (Pattern::Exact("ip_route_use_hint"), "ip_forward.fib"),
    (Pattern::Exact("ip_mkroute_input"), "ip_forward.fib"),
    (Pattern::Exact("rt_dst_alloc"), "ip_forward.fib"),
    // netfilter: rule evaluation, conntrack, NAT, then the hook machinery.
    (Pattern::Exact("ipt_do_table"), "netfilter.rules"),
    (Pattern::Exact("ip6t_do_table"), "netfilter.rules"),
    (Pattern::Exact("ebt_do_table"), "netfilter.rules"),
    (Pattern::Prefix("nft_"), "netfilter.rules"),
    (Pattern::Prefix("xt_"), "netfilter.rules"),
    (Pattern::Prefix("iptable_"), "netfilter.rules"),
    (Pattern::Exact("tcp_mt"), "netfilter.rules"),
    (Pattern::Exact("udp_mt"), "netfilter.rules"),
    (Pattern::Exact("comment_mt"), "netfilter.rules"),
    (Pattern::Exact("conntrack_mt"), "netfilter.rules"),
    (Pattern::Exact("mark_mt"), "netfilter.rules"),
    (Pattern::Exact("set_match_v4"), "netfilter.rules"),
    (Pattern::Prefix("nf_nat_"), "netfilter.nat"),
    (Pattern::Prefix("__nf_nat_"), "netfilter.nat"),
    (Pattern::Prefix("iptable_nat_"), "netfilter.nat"),
    (Pattern::Prefix("nf_conntrack_"), "netfilter.conntrack"),
    (Pattern::Prefix("__nf_conntrack_"), "netfilter.conntrack"),
    (Pattern::Prefix("nf_ct_"), "netfilter.conntrack"),
    (Pattern::Prefix("__nf_ct_"), "netfilter.conntrack"),
    (Pattern::Prefix("ipv4_conntrack_"), "netfilter.conntrack"),
    (Pattern::Prefix("ipv4_confirm"), "netfilter.conntrack"),
    (Pattern::Prefix("nf_confirm"), "netfilter.conntrack"),
    (Pattern::Prefix("hash_conntrack"), "netfilter.conntrack"),
    (Pattern::Prefix("tcp_in_window"), "netfilter.conntrack"),
    (Pattern::Prefix("nf_hook"), "netfilter.hook"),
    (Pattern::Prefix("nf_"), "netfilter.hook"),
    (Pattern::Prefix("__nf_"), "netfilter.hook"),
    // Overlays.
    (Pattern::Prefix("vxlan_"), "vxlan"),
    (Pattern::Prefix("__vxlan_"), "vxlan"),
    (Pattern::Prefix("ipip_"), "ipip"),
    // Only the ip_tunnel entry points ipip uses: ip_tunnel_core helpers also run under vxlan.
    (Pattern::Exact("ip_tunnel_xmit"), "ipip"),
    (Pattern::Exact("ip_tunnel_rcv"), "ipip"),
    (Pattern::Exact("ip_tunnel_lookup"), "ipip"),
    // eBPF on the datapath. cnitrace's own programs are reported as its self-cost instead.
    (Pattern::JitImage, "bpf.prog"),
    (Pattern::Prefix("bpf_dispatcher_"), "bpf.prog"),
    (Pattern::Prefix("___bpf_prog_run"), "bpf.prog"),
    (Pattern::Prefix("__bpf_prog_run"), "bpf.prog"),
    (Pattern::Prefix("bpf_skb_"), "bpf.helpers"),
    (Pattern::Prefix("bpf_redirect"), "bpf.helpers"),
    (Pattern::Exact("skb_do_redirect"), "bpf.helpers"),
    (Pattern::Exact("bpf_csum_diff"), "bpf.helpers"),
    (Pattern::Exact("bpf_l3_csum_replace"), "bpf.helpers"),
    (Pattern::Exact("bpf_l4_csum_replace"), "bpf.helpers"),
    (Pattern::Prefix("tcx_"), "bpf.hook"),
    (Pattern::Prefix("cls_bpf_"), "bpf.hook"),
    // veth.
    (Pattern::Prefix("veth_"), "veth"),
    // Open vSwitch.
    (Pattern::Prefix("ovs_"), "ovs"),
    // Software segmentation and checksumming.
    (Pattern::Exact("skb_segment"), "tunnel_offload.gso"),
    (Pattern::Exact("skb_segment_list"), "tunnel_offload.gso"),
    (Pattern::Prefix("__skb_gso_segment"), "tunnel_offload.gso"),
    (Pattern::Exact("skb_mac_gso_segment"), "tunnel_offload.gso"),
    (Pattern::Exact("inet_gso_segment"), "tunnel_offload.gso"),
    (Pattern::Exact("tcp_gso_segment"), "tunnel_offload.gso"),
    (Pattern::Exact("tcp4_gso_segment"), "tunnel_offload.gso"),
    (Pattern::Exact("__udp_gso_segment"), "tunnel_offload.gso"),
    (Pattern::Exact("udp4_ufo_fragment"), "tunnel_offload.gso"),
    (
        Pattern::Exact("skb_udp_tunnel_segment"),
        "tunnel_offload.gso",
    ),
    (
        Pattern::Exact("__skb_udp_tunnel_segment"),
        "tunnel_offload.gso",
    ),
    (Pattern::Exact("ipip_gso_segment"), "tunnel_offload.gso"),
    (Pattern::Exact("ip_send_check"), "tunnel_offload.csum"),
    (Pattern::Exact("skb_checksum_help"), "tunnel_offload.csum"),
    (Pattern::Exact("skb_checksum"), "tunnel_offload.csum"),
    (Pattern::Exact("__skb_checksum"), "tunnel_offload.csum"),
    (Pattern::Exact("csum_partial"), "tunnel_offload.csum"),
    (Pattern::Exact("do_csum"), "tunnel_offload.csum"),
    (
        Pattern::Exact("csum_partial_copy_generic"),
        "tunnel_offload.csum",
    ),
];

/// Functions that show a sample taken on the idle task was really interrupt or softirq work.
const INTERRUPT_FRAMES: &[Pattern] = &[
    Pattern::Prefix("asm_sysvec_"),
    Pattern::Prefix("asm_common_interrupt"),
    Pattern::Prefix("sysvec_"),
    Pattern::Prefix("__sysvec_"),
    Pattern::Exact("common_interrupt"),
    Pattern::Prefix("irq_exit"),
    Pattern::Prefix("__irq_exit"),
    Pattern::Exact("handle_softirqs"),
    Pattern::Exact("__do_softirq"),
    Pattern::Exact("do_softirq"),
    Pattern::Exact("net_rx_action"),
    Pattern::Exact("net_tx_action"),
];

pub use crate::kallsyms::base_name;

/// The dotted (sub-)component a kernel function belongs to, or `None` if it is outside the
/// datapath taxonomy. cnitrace's own programs map to [`SELF_COST`].
pub fn classify(symbol: &str) -> Option<&'static str> {
    let name = base_name(symbol);
    if is_own_program(name) {
        return Some(SELF_COST);
    }
    RULES
        .iter()
        .find(|(pattern, _)| pattern.matches(name))
        .map(|&(_, component)| component)
}

/// The program name of a JITed program's symbol, `bpf_prog_<16 hex digit tag>_<name>`.
fn jit_image_name(symbol: &str) -> Option<&str> {
    let (tag, name) = symbol.strip_prefix("bpf_prog_")?.split_once('_')?;
    (tag.len() == 16 && tag.bytes().all(|b| b.is_ascii_hexdigit())).then_some(name)
}

fn is_own_program(name: &str) -> bool {
    jit_image_name(name).is_some_and(|prog| prog.starts_with(cnitrace_common::program::PREFIX))
}

/// Whether a frame is interrupt-entry or softirq code.
pub fn is_interrupt_frame(symbol: &str) -> bool {
    let name = base_name(symbol);
    INTERRUPT_FRAMES.iter().any(|pattern| pattern.matches(name))
}

/// The top-level component of a dotted name (`netfilter.conntrack` -> `netfilter`).
pub fn top_level(name: &str) -> &str {
    name.split_once('.').map_or(name, |(top, _)| top)
}

/// Every dotted name the rules can produce, plus the `other.*` ones (for tests and docs).
pub fn all_subcomponents() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = RULES.iter().map(|&(_, c)| c).collect();
    names.extend([SELF_COST, OTHER_USER, OTHER_KERNEL]);
    names.sort_unstable();
    names.dedup();
    names
}

/// Why a component is unavailable on this kernel, or `None` if it is present.
pub fn unavailable_reason(
    component: &Component,
    has_symbol: impl Fn(&str) -> bool,
) -> Option<String> {
    if component.anchors.is_empty() || component.anchors.iter().any(|anchor| has_symbol(anchor)) {
        return None;
    }
    Some(format!(
        "none of {} is in /proc/kallsyms: {}",
        component.anchors.join(", "),
        component.missing_hint
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_the_paper_functions() {
        let cases = [
            ("br_forward", Some("bridge")),
            ("br_handle_frame_finish", Some("bridge")),
            ("__br_forward", Some("bridge")),
            ("br_nf_pre_routing", Some("netfilter.bridge")),
            ("br_nf_pre_routing.cold", Some("netfilter.bridge")),
            ("ip_forward", Some("ip_forward.forward")),
            ("ip_forward_finish", Some("ip_forward.forward")),
            ("fib_table_lookup", Some("ip_forward.fib")),
            ("ip_route_input_slow", Some("ip_forward.fib")),
            ("nf_hook_slow", Some("netfilter.hook")),
            ("ipt_do_table", Some("netfilter.rules")),
            ("nft_do_chain", Some("netfilter.rules")),
            ("nf_conntrack_in", Some("netfilter.conntrack")),
            ("nf_nat_ipv4_fn", Some("netfilter.nat")),
            ("vxlan_xmit", Some("vxlan")),
            ("vxlan_rcv", Some("vxlan")),
            ("ipip_tunnel_xmit", Some("ipip")),
            ("veth_xmit", Some("veth")),
            ("veth_poll", Some("veth")),
            ("ovs_dp_process_packet", Some("ovs")),
            ("ip_send_check", Some("tunnel_offload.csum")),
            ("skb_segment", Some("tunnel_offload.gso")),
            ("bpf_prog_3b185187f1855c4c_cilium_from", Some("bpf.prog")),
            ("bpf_prog_3b185187f1855c4c_cnitrace_tx", Some(SELF_COST)),
            // Kernel functions that only look like program images.
            ("bpf_prog_load", None),
            ("bpf_prog_run_array_cg", None),
            ("tcp_sendmsg", None),
            ("ip_rcv", None),
            ("iptunnel_xmit", None),
        ];
        for (symbol, expected) in cases {
            assert_eq!(classify(symbol), expected, "{symbol}");
        }
    }

    #[test]
    fn every_rule_maps_to_a_contract_component() {
        let names: Vec<&str> = COMPONENTS.iter().map(|c| c.name).collect();
        for sub in all_subcomponents() {
            assert!(
                names.contains(&top_level(sub)),
                "{sub} has no top-level component"
            );
        }
        for required in [
            "bridge",
            "ip_forward",
            "netfilter",
            "vxlan",
            "ipip",
            "bpf",
            "veth",
            "ovs",
            "tunnel_offload",
            "other",
        ] {
            assert!(
                names.contains(&required),
                "{required} missing from the taxonomy"
            );
        }
    }

    #[test]
    fn anchors_classify_into_their_own_component() {
        for component in COMPONENTS {
            for anchor in component.anchors {
                let class = classify(anchor).expect("anchor must be classified");
                assert_eq!(top_level(class), component.name, "{anchor}");
            }
        }
    }

    #[test]
    fn reports_missing_code_with_a_reason() {
        let ipip = COMPONENTS.iter().find(|c| c.name == "ipip").unwrap();
        let reason = unavailable_reason(ipip, |_| false).unwrap();
        assert!(reason.contains("ipip_tunnel_xmit") && reason.contains("CONFIG_NET_IPIP"));
        assert_eq!(unavailable_reason(ipip, |s| s == "ipip_rcv"), None);
        let other = COMPONENTS.iter().find(|c| c.name == OTHER).unwrap();
        assert_eq!(unavailable_reason(other, |_| false), None);
    }

    #[test]
    fn recognises_interrupt_frames() {
        assert!(is_interrupt_frame("asm_sysvec_apic_timer_interrupt"));
        assert!(is_interrupt_frame("handle_softirqs"));
        assert!(!is_interrupt_frame("default_idle"));
        assert!(!is_interrupt_frame("do_idle"));
    }

    #[test]
    fn unavailable_lists_absent_components_with_reasons() {
        let syms = crate::kallsyms::Kallsyms::parse(
            "ffffffff81000000 t br_forward\nffffffff81000100 t nf_hook_slow\n",
        );
        let unavailable = unavailable(&syms);
        let names: Vec<&str> = unavailable.iter().map(|u| u.name.as_str()).collect();
        assert!(names.contains(&"ipip") && names.contains(&"vxlan") && names.contains(&"ovs"));
        assert!(!names.contains(&"bridge") && !names.contains(&"netfilter"));
        assert!(!names.contains(&"other") && !names.contains(&"bpf"));
        assert!(unavailable.iter().all(|u| !u.reason.is_empty()));
    }
}
