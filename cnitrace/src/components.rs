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
pub const OTHER_TCP: &str = "other.tcp";
pub const OTHER_UDP: &str = "other.udp";
pub const OTHER_IP: &str = "other.ip";
pub const OTHER_NETDEV: &str = "other.netdev";
pub const OTHER_COPY: &str = "other.copy";
pub const OTHER_MEMORY: &str = "other.memory";
pub const OTHER_LOCKS: &str = "other.locks";
pub const OTHER_IRQ: &str = "other.irq";
pub const OTHER_SCHED: &str = "other.sched";
pub const OTHER_SYSCALL: &str = "other.syscall";

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
        // bridge-netfilter's hooks too: the bridge runs its hooks itself (nf_hook_bridge_pre),
        // not through nf_hook_slow, so without them their time would be the bridge's, where
        // sampling says netfilter.bridge. Names differ across kernels; absent ones are listed.
        traced: &[
            "nf_hook_slow",
            "br_nf_pre_routing",
            "br_nf_forward_ip",
            "br_nf_forward",
            "br_nf_post_routing",
        ],
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
        name: "tc",
        description: "traffic control: shaping qdiscs (tbf, htb), the classifier and action framework (also around BPF classifiers, whose programs are bpf), the ifb device; the CNI bandwidth plugin's limits",
        anchors: &["tcf_classify"],
        colour: "#d37295",
        traced: &["tbf_enqueue", "tbf_dequeue", "ifb_xmit", "tcf_mirred_act"],
        missing_hint: "the kernel has no traffic control classifiers (CONFIG_NET_CLS)",
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
        // The tracer times the two hand-offs components make on every packet as the host's,
        // so that, as under sampling's layer rule, the bridge's transmit queue and the veth's
        // hand-off to its peer's backlog are not the bridge's or the veth's time. (`other`'s
        // own figure stays the busy time no component covered.)
        traced: &["__dev_queue_xmit", "__netif_rx"],
        missing_hint: "",
    },
];

/// The colour of a component, or of `other` for anything not in the taxonomy. The host's
/// groups (`other.tcp`, ...) have their own shades.
pub fn colour(name: &str) -> &'static str {
    if let Some(&(_, _, shade)) = HOST_GROUPS.iter().find(|(group, _, _)| *group == name) {
        return shade;
    }
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
    // br_netfilter's header validation, called only from br_nf_* hooks.
    (Pattern::Exact("br_validate_ipv4"), "netfilter.bridge"),
    (Pattern::Exact("br_validate_ipv6"), "netfilter.bridge"),
    (Pattern::Prefix("br_"), "bridge"),
    (Pattern::Prefix("__br_"), "bridge"),
    (Pattern::Prefix("nbp_"), "bridge"),
    // IP forwarding and the FIB.
    (Pattern::Prefix("ip_forward"), "ip_forward.forward"),
    (Pattern::Prefix("ip6_forward"), "ip_forward.forward"),
    (Pattern::Prefix("fib_"), "ip_forward.fib"),
    (Pattern::Prefix("fib6_"), "ip_forward.fib"),
    (Pattern::Prefix("ip6_route_input"), "ip_forward.fib"),
    (Pattern::Prefix("ip6_pol_route"), "ip_forward.fib"),
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
    (Pattern::Prefix("iptable_nat_"), "netfilter.nat"),
    (Pattern::Prefix("iptable_"), "netfilter.rules"),
    (Pattern::Exact("tcp_mt"), "netfilter.rules"),
    (Pattern::Exact("udp_mt"), "netfilter.rules"),
    (Pattern::Exact("comment_mt"), "netfilter.rules"),
    (Pattern::Exact("conntrack_mt"), "netfilter.rules"),
    (Pattern::Exact("mark_mt"), "netfilter.rules"),
    (Pattern::Exact("set_match_v4"), "netfilter.rules"),
    (Pattern::Prefix("nf_nat_"), "netfilter.nat"),
    (Pattern::Prefix("__nf_nat_"), "netfilter.nat"),
    // IPVS (kube-proxy's ipvs mode) runs from netfilter hooks.
    (Pattern::Prefix("ip_vs_"), "netfilter.ipvs"),
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
    (Pattern::Exact("ipip_gso_segment"), "tunnel_offload.gso"),
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
    // Traffic control (the BPF programs and hooks above come first): what the bandwidth plugin
    // installs (tbf on the host veth, an ifb device fed by a mirred redirect) and its kin;
    // tcf_classify also runs legacy tc BPF classifiers, and its own cycles are tc's.
    (Pattern::Prefix("tbf_"), "tc.qdisc"),
    (Pattern::Prefix("htb_"), "tc.qdisc"),
    (Pattern::Prefix("hfsc_"), "tc.qdisc"),
    (Pattern::Exact("tcf_classify"), "tc.filter"),
    (Pattern::Prefix("u32_"), "tc.filter"),
    (Pattern::Exact("fl_classify"), "tc.filter"),
    (Pattern::Prefix("tcf_"), "tc.action"),
    (Pattern::Prefix("ifb_"), "tc.ifb"),
    // veth, and netkit (its BPF-programmable successor).
    (Pattern::Prefix("veth_"), "veth"),
    (Pattern::Prefix("netkit_"), "veth"),
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

/// The host's own work, in named groups: sub-components of `other`, for stacks with no
/// datapath frame at all (the endpoints' TCP/IP stacks, copies, scheduling, ...). As with
/// [`RULES`], the innermost match decides, and specific rules come first.
const HOST_RULES: &[(Pattern, &str)] = &[
    // Copies between user and kernel buffers (socket payload).
    (Pattern::Prefix("copy_user_"), OTHER_COPY),
    (Pattern::Prefix("_copy_to_"), OTHER_COPY),
    (Pattern::Prefix("_copy_from_"), OTHER_COPY),
    (Pattern::Prefix("copy_page_to_iter"), OTHER_COPY),
    (Pattern::Prefix("copy_page_from_iter"), OTHER_COPY),
    (Pattern::Prefix("rep_movs_"), OTHER_COPY),
    (Pattern::Prefix("rep_stos_"), OTHER_COPY),
    (Pattern::Exact("memcpy"), OTHER_COPY),
    (Pattern::Exact("__memcpy"), OTHER_COPY),
    (Pattern::Exact("memmove"), OTHER_COPY),
    (Pattern::Exact("memset"), OTHER_COPY),
    (Pattern::Exact("__memset"), OTHER_COPY),
    (Pattern::Prefix("skb_copy_datagram"), OTHER_COPY),
    (Pattern::Prefix("__skb_datagram_iter"), OTHER_COPY),
    (Pattern::Exact("simple_copy_to_iter"), OTHER_COPY),
    (Pattern::Prefix("skb_do_copy_data"), OTHER_COPY),
    (Pattern::Prefix("csum_and_copy"), OTHER_COPY),
    // Checksums touch the payload as copies do (under a tunnel they are tunnel_offload).
    (Pattern::Prefix("csum_"), OTHER_COPY),
    (Pattern::Exact("do_csum"), OTHER_COPY),
    // skbs and the memory under them.
    (Pattern::Prefix("__alloc_skb"), OTHER_MEMORY),
    (Pattern::Prefix("alloc_skb"), OTHER_MEMORY),
    (Pattern::Prefix("__napi_alloc_skb"), OTHER_MEMORY),
    (Pattern::Prefix("napi_alloc_skb"), OTHER_MEMORY),
    (Pattern::Prefix("napi_skb_cache"), OTHER_MEMORY),
    (Pattern::Prefix("kfree_skb"), OTHER_MEMORY),
    (Pattern::Prefix("__kfree_skb"), OTHER_MEMORY),
    (Pattern::Prefix("consume_skb"), OTHER_MEMORY),
    (Pattern::Prefix("napi_consume_skb"), OTHER_MEMORY),
    (Pattern::Prefix("skb_release_"), OTHER_MEMORY),
    (Pattern::Prefix("skb_free_"), OTHER_MEMORY),
    (Pattern::Prefix("skb_attempt_defer_free"), OTHER_MEMORY),
    (Pattern::Prefix("skb_clone"), OTHER_MEMORY),
    (Pattern::Prefix("__skb_clone"), OTHER_MEMORY),
    (Pattern::Prefix("kmem_cache_"), OTHER_MEMORY),
    (Pattern::Prefix("__kmem_cache_"), OTHER_MEMORY),
    (Pattern::Prefix("kmalloc"), OTHER_MEMORY),
    (Pattern::Prefix("__kmalloc"), OTHER_MEMORY),
    (Pattern::Prefix("kfree"), OTHER_MEMORY),
    (Pattern::Prefix("__slab_"), OTHER_MEMORY),
    (Pattern::Prefix("___slab_"), OTHER_MEMORY),
    (Pattern::Prefix("slab_"), OTHER_MEMORY),
    (Pattern::Prefix("page_frag_"), OTHER_MEMORY),
    (Pattern::Prefix("__page_frag_"), OTHER_MEMORY),
    (Pattern::Prefix("skb_page_frag_refill"), OTHER_MEMORY),
    (Pattern::Prefix("sk_page_frag_refill"), OTHER_MEMORY),
    (Pattern::Prefix("alloc_pages"), OTHER_MEMORY),
    (Pattern::Prefix("__alloc_pages"), OTHER_MEMORY),
    (Pattern::Prefix("__alloc_frozen_pages"), OTHER_MEMORY),
    (Pattern::Prefix("get_page_from_freelist"), OTHER_MEMORY),
    (Pattern::Prefix("rmqueue"), OTHER_MEMORY),
    (Pattern::Prefix("__rmqueue"), OTHER_MEMORY),
    (Pattern::Prefix("free_unref_"), OTHER_MEMORY),
    (Pattern::Prefix("__free_pages"), OTHER_MEMORY),
    (Pattern::Prefix("free_frozen_pages"), OTHER_MEMORY),
    (Pattern::Prefix("__folio_put"), OTHER_MEMORY),
    (Pattern::Prefix("put_page"), OTHER_MEMORY),
    (Pattern::Prefix("mem_cgroup_"), OTHER_MEMORY),
    (Pattern::Prefix("__mem_cgroup_"), OTHER_MEMORY),
    (Pattern::Prefix("memcg_"), OTHER_MEMORY),
    (Pattern::Prefix("obj_cgroup_"), OTHER_MEMORY),
    (Pattern::Prefix("refill_obj_stock"), OTHER_MEMORY),
    (Pattern::Prefix("__sk_mem_"), OTHER_MEMORY),
    (Pattern::Prefix("sk_mem_"), OTHER_MEMORY),
    // Locks.
    (Pattern::Prefix("_raw_spin_"), OTHER_LOCKS),
    (Pattern::Prefix("raw_spin_"), OTHER_LOCKS),
    (Pattern::Prefix("queued_spin_"), OTHER_LOCKS),
    (Pattern::Prefix("native_queued_spin"), OTHER_LOCKS),
    (Pattern::Prefix("__pv_queued_spin"), OTHER_LOCKS),
    (Pattern::Prefix("_raw_read_"), OTHER_LOCKS),
    (Pattern::Prefix("_raw_write_"), OTHER_LOCKS),
    (Pattern::Prefix("mutex_"), OTHER_LOCKS),
    (Pattern::Prefix("__mutex_"), OTHER_LOCKS),
    (Pattern::Prefix("lock_sock"), OTHER_LOCKS),
    (Pattern::Prefix("__lock_sock"), OTHER_LOCKS),
    (Pattern::Prefix("release_sock"), OTHER_LOCKS),
    (Pattern::Prefix("__release_sock"), OTHER_LOCKS),
    // The endpoints' transport and IP layers.
    (Pattern::Prefix("tcp"), OTHER_TCP),
    (Pattern::Prefix("__tcp"), OTHER_TCP),
    (Pattern::Prefix("inet_csk_"), OTHER_TCP),
    (Pattern::Prefix("__inet_lookup"), OTHER_TCP),
    (Pattern::Prefix("sk_stream_"), OTHER_TCP),
    (Pattern::Prefix("udp"), OTHER_UDP),
    (Pattern::Prefix("__udp"), OTHER_UDP),
    (Pattern::Prefix("ip_rcv"), OTHER_IP),
    (Pattern::Prefix("ip_list_rcv"), OTHER_IP),
    (Pattern::Prefix("ip_sublist_rcv"), OTHER_IP),
    (Pattern::Prefix("ip_local_"), OTHER_IP),
    (Pattern::Prefix("__ip_local_"), OTHER_IP),
    (Pattern::Prefix("ip_protocol_deliver"), OTHER_IP),
    (Pattern::Prefix("ip_output"), OTHER_IP),
    (Pattern::Exact("ip_send_check"), OTHER_IP),
    (Pattern::Prefix("inet_gso_"), OTHER_IP),
    (Pattern::Prefix("ip_finish_output"), OTHER_IP),
    (Pattern::Prefix("__ip_finish_output"), OTHER_IP),
    (Pattern::Prefix("ip_queue_xmit"), OTHER_IP),
    (Pattern::Prefix("__ip_queue_xmit"), OTHER_IP),
    (Pattern::Prefix("inet_gro_"), OTHER_IP),
    (Pattern::Prefix("raw_local_deliver"), OTHER_IP),
    (Pattern::Prefix("neigh_"), OTHER_IP),
    (Pattern::Prefix("__neigh_"), OTHER_IP),
    (Pattern::Prefix("dst_"), OTHER_IP),
    // The device layer: receive, GRO, backlog, queueing disciplines, transmit.
    (Pattern::Prefix("netif_"), OTHER_NETDEV),
    (Pattern::Prefix("__netif_"), OTHER_NETDEV),
    (Pattern::Prefix("netdev_"), OTHER_NETDEV),
    (Pattern::Prefix("napi_"), OTHER_NETDEV),
    (Pattern::Prefix("__napi_"), OTHER_NETDEV),
    (Pattern::Prefix("gro_"), OTHER_NETDEV),
    (Pattern::Prefix("dev_"), OTHER_NETDEV),
    (Pattern::Prefix("__dev_"), OTHER_NETDEV),
    (Pattern::Prefix("enqueue_to_backlog"), OTHER_NETDEV),
    (Pattern::Prefix("process_backlog"), OTHER_NETDEV),
    (Pattern::Prefix("sch_direct_xmit"), OTHER_NETDEV),
    (Pattern::Prefix("__qdisc_"), OTHER_NETDEV),
    (Pattern::Prefix("qdisc_"), OTHER_NETDEV),
    (Pattern::Prefix("pfifo_"), OTHER_NETDEV),
    (Pattern::Prefix("fq_codel_"), OTHER_NETDEV),
    (Pattern::Prefix("validate_xmit_"), OTHER_NETDEV),
    (Pattern::Prefix("eth_type_trans"), OTHER_NETDEV),
    (Pattern::Prefix("skb_"), OTHER_NETDEV),
    (Pattern::Prefix("__skb_"), OTHER_NETDEV),
    (Pattern::Prefix("loopback_"), OTHER_NETDEV),
    // macvlan and ipvlan have no component of their own (yet): their drivers are device work.
    (Pattern::Prefix("macvlan_"), OTHER_NETDEV),
    (Pattern::Prefix("ipvlan_"), OTHER_NETDEV),
    // Interrupt and softirq machinery.
    (Pattern::Prefix("asm_"), OTHER_IRQ),
    (Pattern::Prefix("sysvec_"), OTHER_IRQ),
    (Pattern::Prefix("__sysvec_"), OTHER_IRQ),
    (Pattern::Prefix("common_interrupt"), OTHER_IRQ),
    (Pattern::Prefix("__common_interrupt"), OTHER_IRQ),
    (Pattern::Prefix("irq_"), OTHER_IRQ),
    (Pattern::Prefix("__irq_"), OTHER_IRQ),
    (Pattern::Prefix("irqentry_"), OTHER_IRQ),
    (Pattern::Prefix("handle_softirqs"), OTHER_IRQ),
    (Pattern::Prefix("__do_softirq"), OTHER_IRQ),
    (Pattern::Prefix("do_softirq"), OTHER_IRQ),
    (Pattern::Prefix("net_rx_action"), OTHER_IRQ),
    (Pattern::Prefix("net_tx_action"), OTHER_IRQ),
    (Pattern::Prefix("__local_bh_enable"), OTHER_IRQ),
    (Pattern::Prefix("local_bh_enable"), OTHER_IRQ),
    (Pattern::Prefix("raise_softirq"), OTHER_IRQ),
    (Pattern::Prefix("__raise_softirq"), OTHER_IRQ),
    (Pattern::Prefix("handle_edge_irq"), OTHER_IRQ),
    (Pattern::Prefix("handle_irq_event"), OTHER_IRQ),
    (Pattern::Prefix("__handle_irq_event"), OTHER_IRQ),
    (Pattern::Prefix("generic_smp_call"), OTHER_IRQ),
    (Pattern::Prefix("__flush_smp_call"), OTHER_IRQ),
    (Pattern::Prefix("flush_smp_call"), OTHER_IRQ),
    // The scheduler, wake-ups, timers and the idle loop's entry and exit.
    (Pattern::Prefix("schedule"), OTHER_SCHED),
    (Pattern::Prefix("__schedule"), OTHER_SCHED),
    (Pattern::Prefix("pick_next_"), OTHER_SCHED),
    (Pattern::Prefix("__pick_next_"), OTHER_SCHED),
    (Pattern::Prefix("enqueue_"), OTHER_SCHED),
    (Pattern::Prefix("dequeue_"), OTHER_SCHED),
    (Pattern::Prefix("try_to_wake_up"), OTHER_SCHED),
    (Pattern::Prefix("ttwu_"), OTHER_SCHED),
    (Pattern::Prefix("wake_up"), OTHER_SCHED),
    (Pattern::Prefix("__wake_up"), OTHER_SCHED),
    (Pattern::Prefix("update_curr"), OTHER_SCHED),
    (Pattern::Prefix("update_load_avg"), OTHER_SCHED),
    (Pattern::Prefix("update_cfs"), OTHER_SCHED),
    (Pattern::Prefix("finish_task_switch"), OTHER_SCHED),
    (Pattern::Prefix("__switch_to"), OTHER_SCHED),
    (Pattern::Prefix("switch_mm"), OTHER_SCHED),
    (Pattern::Prefix("select_task_rq"), OTHER_SCHED),
    (Pattern::Prefix("check_preempt"), OTHER_SCHED),
    (Pattern::Prefix("resched_"), OTHER_SCHED),
    (Pattern::Prefix("sched_"), OTHER_SCHED),
    (Pattern::Prefix("native_sched_clock"), OTHER_SCHED),
    (Pattern::Prefix("psi_"), OTHER_SCHED),
    (Pattern::Prefix("account_"), OTHER_SCHED),
    (Pattern::Prefix("hrtimer_"), OTHER_SCHED),
    (Pattern::Prefix("__hrtimer_"), OTHER_SCHED),
    (Pattern::Prefix("tick_"), OTHER_SCHED),
    (Pattern::Prefix("ktime_get"), OTHER_SCHED),
    (Pattern::Prefix("rcu_"), OTHER_SCHED),
    (Pattern::Prefix("__rcu_"), OTHER_SCHED),
    (Pattern::Prefix("do_idle"), OTHER_SCHED),
    (Pattern::Prefix("cpuidle_"), OTHER_SCHED),
    (Pattern::Prefix("default_idle"), OTHER_SCHED),
    (Pattern::Prefix("arch_cpu_idle"), OTHER_SCHED),
    (Pattern::Prefix("cpu_startup_entry"), OTHER_SCHED),
    (Pattern::Prefix("native_safe_halt"), OTHER_SCHED),
    (Pattern::Prefix("pv_native_safe_halt"), OTHER_SCHED),
    (Pattern::Prefix("sk_wait_data"), OTHER_SCHED),
    (Pattern::Prefix("wait_woken"), OTHER_SCHED),
    (Pattern::Prefix("woken_wake_function"), OTHER_SCHED),
    (Pattern::Prefix("autoremove_wake_function"), OTHER_SCHED),
    (Pattern::Prefix("prepare_to_wait"), OTHER_SCHED),
    (Pattern::Prefix("finish_wait"), OTHER_SCHED),
    // System calls, the socket layer, files and security hooks.
    (Pattern::Prefix("entry_SYSCALL"), OTHER_SYSCALL),
    (Pattern::Prefix("do_syscall"), OTHER_SYSCALL),
    (Pattern::Prefix("syscall_"), OTHER_SYSCALL),
    (Pattern::Prefix("x64_sys_call"), OTHER_SYSCALL),
    (Pattern::Prefix("__x64_sys_"), OTHER_SYSCALL),
    (Pattern::Prefix("__sys_"), OTHER_SYSCALL),
    (Pattern::Prefix("ksys_"), OTHER_SYSCALL),
    (Pattern::Prefix("exit_to_user_mode"), OTHER_SYSCALL),
    (Pattern::Prefix("vfs_"), OTHER_SYSCALL),
    (Pattern::Prefix("sock_"), OTHER_SYSCALL),
    (Pattern::Prefix("__sock_"), OTHER_SYSCALL),
    (Pattern::Prefix("inet_sendmsg"), OTHER_SYSCALL),
    (Pattern::Prefix("inet_recvmsg"), OTHER_SYSCALL),
    (Pattern::Prefix("security_"), OTHER_SYSCALL),
    (Pattern::Prefix("apparmor_"), OTHER_SYSCALL),
    (Pattern::Prefix("selinux_"), OTHER_SYSCALL),
    (Pattern::Prefix("fdget"), OTHER_SYSCALL),
    (Pattern::Prefix("__fdget"), OTHER_SYSCALL),
    (Pattern::Prefix("fput"), OTHER_SYSCALL),
    (Pattern::Prefix("__fget"), OTHER_SYSCALL),
    (Pattern::Prefix("do_epoll_"), OTHER_SYSCALL),
    (Pattern::Prefix("ep_"), OTHER_SYSCALL),
    (Pattern::Prefix("do_select"), OTHER_SYSCALL),
    (Pattern::Prefix("do_sys_poll"), OTHER_SYSCALL),
];

/// The named groups of the host's own work (sub-components of `other`), with what they hold
/// and their shade in flame graphs.
pub const HOST_GROUPS: &[(&str, &str, &str)] = &[
    (
        OTHER_TCP,
        "the endpoints' TCP (send, receive, acknowledgements, timers)",
        "#a0cbe8",
    ),
    (OTHER_UDP, "the endpoints' UDP", "#8cd17d"),
    (
        OTHER_IP,
        "IP receive, local delivery and output, neighbours, routes of local traffic",
        "#ffbe7d",
    ),
    (
        OTHER_NETDEV,
        "the device layer: GRO, backlog, queueing disciplines, transmit",
        "#86bcb6",
    ),
    (
        OTHER_COPY,
        "copies of payload between user and kernel buffers, and checksums outside tunnels",
        "#f1ce63",
    ),
    (
        OTHER_MEMORY,
        "allocating and freeing skbs, pages and slab objects",
        "#d4a6c8",
    ),
    (
        OTHER_LOCKS,
        "spinlocks, mutexes and socket locks",
        "#ff9d9a",
    ),
    (OTHER_IRQ, "interrupt and softirq machinery", "#d7b5a6"),
    (
        OTHER_SCHED,
        "the scheduler, wake-ups, timers and idle entry",
        "#c9c9c9",
    ),
    (
        OTHER_SYSCALL,
        "system call entry, the socket and file layers, security hooks",
        "#b6992d",
    ),
    (OTHER_USER, "user space", "#79706e"),
    (SELF_COST, "cnitrace's own programs", "#9d7660"),
    (
        OTHER_KERNEL,
        "kernel work in none of the groups above, and lost stacks",
        "#bab0ac",
    ),
];

/// The group of the host's own work a kernel function belongs to, for stacks without any
/// datapath frame.
pub fn classify_host(symbol: &str) -> Option<&'static str> {
    let name = base_name(symbol);
    HOST_RULES
        .iter()
        .find(|(pattern, _)| pattern.matches(name))
        .map(|&(_, group)| group)
}

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

/// Where a generic layer of a stack begins: hand-offs between the device, IP and transport
/// layers, and entries into another context (softirq, interrupt, system call). The `layer`
/// attribution rule stops its walk at the first of them (see `attribution`). They overlap
/// on purpose: a kernel that inlines or tail-calls one still shows its neighbours.
const LAYER_BOUNDARIES: &[Pattern] = &[
    // The device layer: receive and transmit hand-offs.
    Pattern::Prefix("__netif_receive_skb"),
    Pattern::Prefix("netif_receive_skb"),
    Pattern::Exact("netif_rx"),
    Pattern::Exact("__netif_rx"),
    Pattern::Exact("netif_rx_internal"),
    Pattern::Exact("process_backlog"),
    Pattern::Exact("napi_gro_receive"),
    Pattern::Exact("gro_receive_skb"),
    Pattern::Exact("__dev_queue_xmit"),
    Pattern::Exact("dev_queue_xmit"),
    Pattern::Exact("dev_hard_start_xmit"),
    // The IP layer.
    Pattern::Exact("ip_rcv"),
    Pattern::Exact("ip_list_rcv"),
    Pattern::Exact("ip_sublist_rcv"),
    Pattern::Exact("ip_local_deliver"),
    Pattern::Exact("ip_local_deliver_finish"),
    Pattern::Exact("ip_output"),
    Pattern::Exact("ip_local_out"),
    Pattern::Exact("__ip_local_out"),
    Pattern::Exact("ip_finish_output"),
    Pattern::Exact("__ip_finish_output"),
    Pattern::Exact("ip_finish_output2"),
    Pattern::Exact("__ip_queue_xmit"),
    Pattern::Exact("ip_queue_xmit"),
    Pattern::Exact("ipv6_rcv"),
    Pattern::Exact("ip6_input"),
    Pattern::Exact("ip6_output"),
    Pattern::Exact("ip6_finish_output"),
    Pattern::Exact("ip6_finish_output2"),
    Pattern::Exact("ip6_xmit"),
    // The transport layer's entries.
    Pattern::Exact("tcp_v4_rcv"),
    Pattern::Exact("tcp_sendmsg"),
    Pattern::Exact("tcp_sendmsg_locked"),
    Pattern::Exact("tcp_recvmsg"),
    Pattern::Exact("tcp_v6_rcv"),
    Pattern::Exact("udp_rcv"),
    Pattern::Exact("__udp4_lib_rcv"),
    Pattern::Exact("udp_sendmsg"),
    Pattern::Exact("udp_recvmsg"),
    // Another context: what ran outside it was interrupted, not calling.
    Pattern::Exact("handle_softirqs"),
    Pattern::Exact("__do_softirq"),
    Pattern::Exact("do_softirq"),
    Pattern::Exact("net_rx_action"),
    Pattern::Exact("net_tx_action"),
    Pattern::Prefix("irq_exit"),
    Pattern::Prefix("__irq_exit"),
    Pattern::Prefix("asm_sysvec_"),
    Pattern::Prefix("sysvec_"),
    Pattern::Exact("asm_common_interrupt"),
    Pattern::Exact("common_interrupt"),
    Pattern::Prefix("entry_SYSCALL"),
    Pattern::Exact("do_syscall_64"),
];

/// Where a cpu-clock sample lands after an interrupts-off section: the timer interrupt that
/// takes it waits until interrupts are enabled again, here.
const INTERRUPT_ENABLE_POINTS: &[Pattern] = &[
    Pattern::Exact("_raw_spin_unlock_irqrestore"),
    Pattern::Exact("_raw_spin_unlock_irq"),
    Pattern::Exact("_raw_read_unlock_irqrestore"),
    Pattern::Exact("_raw_read_unlock_irq"),
    Pattern::Exact("_raw_write_unlock_irqrestore"),
    Pattern::Exact("_raw_write_unlock_irq"),
    // After running pending softirqs with interrupts off, interrupts come back on here.
    Pattern::Exact("__local_bh_enable_ip"),
];

/// Segmentation and checksum helpers that every path uses: they are `tunnel_offload` only
/// under a tunnel (see [`is_tunnel_frame`]); elsewhere they belong to their caller.
const GENERIC_HELPERS: &[Pattern] = &[
    Pattern::Exact("skb_segment"),
    Pattern::Exact("skb_segment_list"),
    Pattern::Prefix("__skb_gso_segment"),
    Pattern::Exact("skb_mac_gso_segment"),
    Pattern::Exact("inet_gso_segment"),
    Pattern::Exact("tcp_gso_segment"),
    Pattern::Exact("tcp4_gso_segment"),
    Pattern::Exact("__udp_gso_segment"),
    Pattern::Exact("skb_checksum_help"),
    Pattern::Exact("skb_checksum"),
    Pattern::Exact("__skb_checksum"),
    Pattern::Exact("csum_partial"),
    Pattern::Exact("do_csum"),
    Pattern::Exact("csum_partial_copy_generic"),
    Pattern::Exact("ip_send_check"),
];

/// Frames that show a helper works for a tunnel: the tunnels' own code and their GSO callbacks.
const TUNNEL_FRAMES: &[Pattern] = &[
    Pattern::Prefix("vxlan_"),
    Pattern::Prefix("ipip_"),
    Pattern::Prefix("ip_tunnel_"),
    Pattern::Prefix("iptunnel_"),
    Pattern::Prefix("udp_tunnel"),
    Pattern::Prefix("skb_udp_tunnel_segment"),
    Pattern::Prefix("__skb_udp_tunnel_segment"),
    Pattern::Prefix("gre_gso_segment"),
    Pattern::Prefix("geneve_"),
];

/// Whether a frame is a segmentation or checksum helper every path uses.
pub fn is_generic_helper(symbol: &str) -> bool {
    matches_any(GENERIC_HELPERS, symbol)
}

/// Whether a frame is a tunnel's (or a tunnel's GSO callback).
pub fn is_tunnel_frame(symbol: &str) -> bool {
    matches_any(TUNNEL_FRAMES, symbol)
}

/// Where softirq handlers are run from (inline or in a thread).
const SOFTIRQ_ENTRIES: &[Pattern] = &[
    Pattern::Exact("handle_softirqs"),
    Pattern::Exact("__do_softirq"),
    Pattern::Exact("net_rx_action"),
    Pattern::Exact("net_tx_action"),
];

/// Threads that run softirq work: ksoftirqd, and NAPI polling in its own thread.
const SOFTIRQ_THREADS: &[Pattern] = &[
    Pattern::Exact("run_ksoftirqd"),
    Pattern::Exact("napi_threaded_poll"),
];

/// Hardware interrupt entries (x86 vectors and the generic handlers).
const HARDIRQ_ENTRIES: &[Pattern] = &[
    Pattern::Prefix("asm_sysvec_"),
    Pattern::Prefix("sysvec_"),
    Pattern::Prefix("__sysvec_"),
    Pattern::Exact("asm_common_interrupt"),
    Pattern::Exact("common_interrupt"),
    Pattern::Prefix("__handle_irq_event"),
    Pattern::Prefix("handle_irq_event"),
];

fn matches_any(patterns: &[Pattern], symbol: &str) -> bool {
    let name = base_name(symbol);
    patterns.iter().any(|pattern| pattern.matches(name))
}

pub fn is_softirq_entry(symbol: &str) -> bool {
    matches_any(SOFTIRQ_ENTRIES, symbol)
}

pub fn is_softirq_thread(symbol: &str) -> bool {
    matches_any(SOFTIRQ_THREADS, symbol)
}

pub fn is_hardirq_entry(symbol: &str) -> bool {
    matches_any(HARDIRQ_ENTRIES, symbol)
}

/// Whether a frame starts a generic layer or another context (see [`LAYER_BOUNDARIES`]).
pub fn is_layer_boundary(symbol: &str) -> bool {
    matches_any(LAYER_BOUNDARIES, symbol)
}

/// Whether a frame is where interrupts are enabled again (see [`INTERRUPT_ENABLE_POINTS`]).
pub fn is_interrupt_enable_point(symbol: &str) -> bool {
    matches_any(INTERRUPT_ENABLE_POINTS, symbol)
}

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

/// The program name of a JITed program's symbol, `bpf_prog_<16 hex digit tag>_<name>`, or
/// `bpf_prog_<tag>` for a program loaded without a name ("").
fn jit_image_name(symbol: &str) -> Option<&str> {
    let rest = symbol.strip_prefix("bpf_prog_")?;
    let (tag, name) = rest.split_once('_').unwrap_or((rest, ""));
    (tag.len() == 16 && tag.bytes().all(|b| b.is_ascii_hexdigit())).then_some(name)
}

fn is_own_program(name: &str) -> bool {
    jit_image_name(name).is_some_and(|prog| prog.starts_with(cnitrace_common::program::PREFIX))
}

/// Whether a frame is interrupt-entry or softirq code.
pub fn is_interrupt_frame(symbol: &str) -> bool {
    matches_any(INTERRUPT_FRAMES, symbol)
}

/// The top-level component of a dotted name (`netfilter.conntrack` -> `netfilter`).
pub fn top_level(name: &str) -> &str {
    name.split_once('.').map_or(name, |(top, _)| top)
}

/// Every dotted name the rules can produce, plus the `other.*` ones (for tests and docs).
pub fn all_subcomponents() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = RULES.iter().map(|&(_, c)| c).collect();
    names.extend(HOST_GROUPS.iter().map(|&(group, _, _)| group));
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
    fn classifies_the_datapath_functions() {
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
            ("tbf_enqueue", Some("tc.qdisc")),
            ("tcf_classify", Some("tc.filter")),
            ("tcf_mirred_act", Some("tc.action")),
            ("ifb_xmit", Some("tc.ifb")),
            ("tcx_run", Some("bpf.hook")),
            ("ip_send_check", Some("tunnel_offload.csum")),
            ("skb_segment", Some("tunnel_offload.gso")),
            ("bpf_prog_3b185187f1855c4c_cilium_from", Some("bpf.prog")),
            ("bpf_prog_3b185187f1855c4c_cnitrace_tx", Some(SELF_COST)),
            // A program loaded without a name.
            ("bpf_prog_3b185187f1855c4c", Some("bpf.prog")),
            ("br_validate_ipv4", Some("netfilter.bridge")),
            ("iptable_nat_do_chain", Some("netfilter.nat")),
            ("ipip_gso_segment", Some("tunnel_offload.gso")),
            ("ip6_forward", Some("ip_forward.forward")),
            ("fib6_table_lookup", Some("ip_forward.fib")),
            ("ip_vs_in_hook", Some("netfilter.ipvs")),
            ("netkit_xmit", Some("veth")),
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
            "tc",
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
    fn groups_the_hosts_own_work() {
        let cases = [
            ("tcp_sendmsg_locked", Some(OTHER_TCP)),
            ("tcp_v4_rcv", Some(OTHER_TCP)),
            ("copy_user_enhanced_fast_string", Some(OTHER_COPY)),
            ("skb_copy_datagram_iter", Some(OTHER_COPY)),
            ("__alloc_skb", Some(OTHER_MEMORY)),
            ("skb_release_data", Some(OTHER_MEMORY)),
            ("_raw_spin_lock_bh", Some(OTHER_LOCKS)),
            ("ip_finish_output2", Some(OTHER_IP)),
            ("__netif_receive_skb_core.constprop.0", Some(OTHER_NETDEV)),
            ("__dev_queue_xmit", Some(OTHER_NETDEV)),
            ("net_rx_action", Some(OTHER_IRQ)),
            ("__schedule", Some(OTHER_SCHED)),
            ("entry_SYSCALL_64_after_hwframe", Some(OTHER_SYSCALL)),
            ("ext4_file_write_iter", None),
        ];
        for (symbol, expected) in cases {
            assert_eq!(classify_host(symbol), expected, "{symbol}");
        }
        // Every group the rules name is described and coloured, and under `other`.
        for &(_, group) in HOST_RULES {
            assert!(HOST_GROUPS.iter().any(|&(g, _, _)| g == group), "{group}");
            assert_eq!(top_level(group), OTHER);
        }
        assert_ne!(colour(OTHER_TCP), colour(OTHER));
        assert_eq!(colour("netfilter.rules"), colour("netfilter"));
    }

    /// A rule no name can reach, because an earlier one takes every name it would match.
    fn shadowed(rules: &[(Pattern, &str)]) -> Vec<String> {
        let mut dead = Vec::new();
        for (i, &(pattern, class)) in rules.iter().enumerate() {
            let (probe, exact) = match pattern {
                Pattern::Exact(s) => (s, true),
                Pattern::Prefix(s) => (s, false),
                Pattern::JitImage => continue,
            };
            let earlier = rules[..i].iter().find(|(p, _)| {
                p.matches(probe) && (exact || matches!(p, Pattern::Prefix(_) | Pattern::JitImage))
            });
            if let Some((p, c)) = earlier {
                dead.push(format!("{pattern:?} -> {class} is taken by {p:?} -> {c}"));
            }
        }
        dead
    }

    #[test]
    fn no_rule_is_shadowed_by_an_earlier_one() {
        assert_eq!(shadowed(RULES), Vec::<String>::new());
        assert_eq!(shadowed(HOST_RULES), Vec::<String>::new());
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
