//! The attribution rule: which (sub-)components one sampled stack is charged to, under each
//! view, and the sampling error of a figure made of counted samples.
//!
//! The `layer` rule walks from the innermost frame outward. The first frame of a datapath
//! component decides. A *layer boundary* stops the walk first if it comes first: a hand-off
//! between layers (`__netif_receive_skb_core`, `__dev_queue_xmit`, `ip_rcv`, `ip_output`,
//! `tcp_v4_rcv`, ...) or the entry of another context (softirq, interrupt, system call).
//! Generic code beneath a boundary is the host's own work (`other`, in the group of its
//! innermost recognised frame), even when a component called the boundary farther out: the
//! bridge's hand-off to `dev_queue_xmit`, VXLAN's underlay `ip_output`, or a softirq that ran
//! at `local_bh_enable` inside netfilter are not the bridge, VXLAN or netfilter.

use cnitrace_common::{SAMPLE_FLAG_IDLE_TASK, SAMPLE_FLAG_USER, STACK_DEPTH};

use crate::{
    breakdown::StackSample,
    components::{self, OTHER_KERNEL, OTHER_USER},
    contract::View,
};

/// How samples are read: the view, and whether the clock skids to interrupt-enable points.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rule {
    pub view: View,
    /// cpu-clock samples are taken by a timer interrupt, which waits while interrupts are
    /// off: the sample lands where they come back on. PMU samples (NMI) do not.
    pub skid: bool,
}

/// Where one busy sample is charged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    /// Dotted classes, each once: one under `layer` and `self`, every component on the stack
    /// under `children`.
    pub classes: Vec<&'static str>,
    /// The sample landed on an interrupt-enable point and was charged from this caller on.
    pub skid_caller: Option<String>,
}

/// The charge of one sample, or `None` if the CPU was idle.
pub fn attribute(sample: &StackSample, rule: Rule) -> Option<Charge> {
    if sample.flags & SAMPLE_FLAG_USER != 0 {
        return Some(single(OTHER_USER));
    }
    if sample.stack_lost || sample.frames.is_empty() {
        return Some(single(OTHER_KERNEL));
    }
    let on_idle_task = sample.flags & SAMPLE_FLAG_IDLE_TASK != 0;
    // The idle loop's own stacks are short: one cut at the depth limit on the idle task is
    // interrupt or softirq work whose entry frames were beyond the limit.
    if on_idle_task
        && !is_truncated(sample)
        && !sample
            .frames
            .iter()
            .any(|f| components::is_interrupt_frame(f))
    {
        return None;
    }
    let (frames, skid_caller) = past_skid(&sample.frames, rule.skid);
    let classes = match rule.view {
        View::Layer => vec![layer_class(frames)],
        View::Leaf => vec![leaf_class(frames)],
        View::Children => children_classes(frames),
    };
    Some(Charge {
        classes,
        skid_caller,
    })
}

/// Whether the kernel cut the stack at the sampler's depth limit (its outermost frames lost).
pub fn is_truncated(sample: &StackSample) -> bool {
    sample.frames.len() >= STACK_DEPTH
}

fn single(class: &'static str) -> Charge {
    Charge {
        classes: vec![class],
        skid_caller: None,
    }
}

/// The frames to attribute: from the caller on when the innermost frame is an
/// interrupt-enable point (and there is a caller), else all of them.
fn past_skid(frames: &[String], skid: bool) -> (&[String], Option<String>) {
    if skid && frames.len() > 1 && components::is_interrupt_enable_point(&frames[0]) {
        let caller = components::base_name(&frames[1]);
        let enable = components::base_name(&frames[0]);
        return (&frames[1..], Some(format!("{caller} <- {enable}")));
    }
    (frames, None)
}

/// The datapath class of `frames[index]`. Segmentation and checksum helpers every path uses
/// (`skb_segment`, `csum_partial`, ...) are `tunnel_offload` only under a tunnel's frame
/// within their layer; elsewhere they have no class of their own and belong to their caller.
fn component_at(frames: &[String], index: usize) -> Option<&'static str> {
    let class = components::classify(&frames[index])?;
    if !components::is_generic_helper(&frames[index]) {
        return Some(class);
    }
    frames[index + 1..]
        .iter()
        .take_while(|frame| !components::is_layer_boundary(frame))
        .any(|frame| components::is_tunnel_frame(frame))
        .then_some(class)
}

/// The `layer` rule (see the module's documentation).
pub fn layer_class(frames: &[String]) -> &'static str {
    let mut walked = frames.len();
    for (depth, frame) in frames.iter().enumerate() {
        if let Some(class) = component_at(frames, depth) {
            return class;
        }
        if components::is_layer_boundary(frame) {
            walked = depth + 1;
            break;
        }
    }
    host_group(&frames[..walked])
}

/// The innermost frame's own class (perf's self time).
pub fn leaf_class(frames: &[String]) -> &'static str {
    component_at(frames, 0)
        .or_else(|| components::classify_host(&frames[0]))
        .unwrap_or(OTHER_KERNEL)
}

/// Every datapath class on the stack, innermost first; a stack with none is the host's.
fn children_classes(frames: &[String]) -> Vec<&'static str> {
    let mut classes: Vec<&'static str> = Vec::new();
    for class in (0..frames.len()).filter_map(|i| component_at(frames, i)) {
        if !classes.contains(&class) {
            classes.push(class);
        }
    }
    if classes.is_empty() {
        classes.push(host_group(frames));
    }
    classes
}

fn host_group(frames: &[String]) -> &'static str {
    frames
        .iter()
        .find_map(|frame| components::classify_host(frame))
        .unwrap_or(OTHER_KERNEL)
}

/// Where a sample's work ran: the first context entry from the innermost frame outward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExecContext {
    HardIrq,
    /// Softirqs run inline, on interrupt exit or at `local_bh_enable`.
    SoftIrq,
    /// Softirq work in a thread: ksoftirqd, threaded NAPI.
    Ksoftirqd,
    /// System calls, kernel threads, user space.
    Process,
    /// Cut at the depth limit before any context entry.
    Unknown,
}

/// The context a sample ran in.
pub fn context_of(sample: &StackSample) -> ExecContext {
    if sample.flags & SAMPLE_FLAG_USER != 0 {
        return ExecContext::Process;
    }
    if sample.stack_lost || sample.frames.is_empty() {
        return ExecContext::Unknown;
    }
    for (depth, frame) in sample.frames.iter().enumerate() {
        if components::is_softirq_entry(frame) {
            let threaded = sample.frames[depth..]
                .iter()
                .any(|f| components::is_softirq_thread(f));
            return if threaded {
                ExecContext::Ksoftirqd
            } else {
                ExecContext::SoftIrq
            };
        }
        if components::is_softirq_thread(frame) {
            return ExecContext::Ksoftirqd;
        }
        if components::is_hardirq_entry(frame) {
            return ExecContext::HardIrq;
        }
    }
    if is_truncated(sample) {
        ExecContext::Unknown
    } else {
        ExecContext::Process
    }
}

/// The standard normal's 97.5% quantile.
const Z_975: f64 = 1.959_964;

/// 95% interval of the mean of a Poisson count `k` (Garwood's exact interval through the
/// Wilson-Hilferty approximation of the chi-square quantiles: within 1% of it from k = 0).
pub fn poisson_ci95(k: u64) -> (f64, f64) {
    let k = k as f64;
    let low = if k == 0.0 {
        0.0
    } else {
        k * (1.0 - 1.0 / (9.0 * k) - Z_975 / (3.0 * k.sqrt())).powi(3)
    };
    let k1 = k + 1.0;
    let high = k1 * (1.0 - 1.0 / (9.0 * k1) + Z_975 / (3.0 * k1.sqrt())).powi(3);
    (low.max(0.0), high)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stack(frames: &[&str]) -> StackSample {
        StackSample {
            frames: frames.iter().map(|f| (*f).to_owned()).collect(),
            count: 1,
            period: 1,
            ..StackSample::default()
        }
    }

    fn charged(frames: &[&str], view: View) -> Vec<&'static str> {
        let rule = Rule { view, skid: true };
        attribute(&stack(frames), rule).unwrap().classes
    }

    #[test]
    fn poisson_interval_matches_garwood() {
        // Exact values: k=0 [0, 3.689], k=10 [4.795, 18.390], k=100 [81.36, 121.63].
        for (k, low, high) in [(0, 0.0, 3.689), (10, 4.795, 18.390), (100, 81.36, 121.63)] {
            let (l, h) = poisson_ci95(k);
            assert!((l - low).abs() <= 0.01 * low.max(1.0), "{k}: {l}");
            assert!((h - high).abs() <= 0.01 * high, "{k}: {h}");
        }
    }

    #[test]
    fn a_boundary_stops_the_walk_before_a_component_farther_out() {
        // Host receive under the bridge's rx handler is the host's, not the bridge's.
        let receive = [
            "tcp_v4_rcv",
            "ip_protocol_deliver_rcu",
            "ip_local_deliver_finish",
            "ip_local_deliver",
            "ip_rcv",
            "__netif_receive_skb_one_core",
            "process_backlog",
            "__napi_poll",
            "net_rx_action",
            "handle_softirqs",
            "do_softirq",
            "__local_bh_enable_ip",
            "br_forward_finish",
        ];
        assert_eq!(charged(&receive, View::Layer), ["other.tcp"]);
        assert_eq!(charged(&receive, View::Leaf), ["other.tcp"]);
        assert_eq!(charged(&receive, View::Children), ["bridge"]);
    }

    #[test]
    fn generic_helpers_called_by_a_component_are_that_component() {
        let helper = [
            "memcpy",
            "skb_copy_bits",
            "br_nf_pre_routing",
            "br_handle_frame",
        ];
        assert_eq!(charged(&helper, View::Layer), ["netfilter.bridge"]);
        assert_eq!(charged(&helper, View::Leaf), ["other.copy"]);
        assert_eq!(
            charged(&helper, View::Children),
            ["netfilter.bridge", "bridge"]
        );
    }

    #[test]
    fn innermost_component_wins_under_layer() {
        let rules = [
            "ipt_do_table",
            "nf_hook_slow",
            "br_nf_pre_routing",
            "br_handle_frame",
        ];
        assert_eq!(charged(&rules, View::Layer), ["netfilter.rules"]);
    }

    #[test]
    fn skid_is_charged_to_the_caller_that_held_interrupts_off() {
        let sample = stack(&[
            "_raw_spin_unlock_irqrestore",
            "__wake_up_common_lock",
            "sock_def_readable",
            "tcp_data_queue",
            "tcp_v4_rcv",
        ]);
        let charge = attribute(
            &sample,
            Rule {
                view: View::Layer,
                skid: true,
            },
        )
        .unwrap();
        assert_eq!(charge.classes, ["other.sched"]);
        assert_eq!(
            charge.skid_caller.as_deref(),
            Some("__wake_up_common_lock <- _raw_spin_unlock_irqrestore")
        );
        // Without skid (PMU), the sample is where it was taken.
        let pmu = attribute(&sample, Rule::default()).unwrap();
        assert_eq!((pmu.classes[0], pmu.skid_caller), ("other.locks", None));
    }

    #[test]
    fn segmentation_and_checksums_are_tunnel_offload_only_under_a_tunnel() {
        let tunnel = [
            "skb_segment",
            "tcp_gso_segment",
            "__skb_udp_tunnel_segment",
            "skb_udp_tunnel_segment",
            "inet_gso_segment",
            "skb_mac_gso_segment",
            "__skb_gso_segment",
            "validate_xmit_skb",
            "__dev_queue_xmit",
            "ip_finish_output2",
        ];
        assert_eq!(charged(&tunnel, View::Layer), ["tunnel_offload.gso"]);
        let plain = [
            "skb_segment",
            "tcp_gso_segment",
            "inet_gso_segment",
            "skb_mac_gso_segment",
            "__skb_gso_segment",
            "validate_xmit_skb",
            "__dev_queue_xmit",
            "br_dev_queue_push_xmit",
        ];
        assert_eq!(charged(&plain, View::Layer), ["other.netdev"]);
        assert_eq!(charged(&plain, View::Leaf), ["other.netdev"]);
        // A checksum conntrack computes is netfilter's; one of the sending endpoint its own.
        let conntrack = [
            "csum_partial",
            "nf_ip_checksum",
            "tcp_error",
            "nf_conntrack_in",
        ];
        assert_eq!(charged(&conntrack, View::Layer), ["netfilter.hook"]);
        let endpoint = ["csum_partial", "__skb_checksum", "tcp_v4_rcv"];
        assert_eq!(charged(&endpoint, View::Layer), ["other.copy"]);
    }

    /// Stacks recorded with `cnitrace profile --stacks` on this project's development VM
    /// (kernel 6.18, cpu-clock), iperf3 through a bridged pod pair with bridge-netfilter on;
    /// innermost frame first. Under the old rule ("the innermost component anywhere on the
    /// stack wins") the last two were bridge and veth.
    const RECORDED: [&[&str]; 4] = [
        &[
            "veth_xmit",
            "dev_hard_start_xmit",
            "__dev_queue_xmit",
            "ip_finish_output2",
            "ip_output",
            "__ip_queue_xmit",
            "__tcp_transmit_skb",
            "tcp_write_xmit",
            "tcp_sendmsg_locked",
            "tcp_sendmsg",
            "sock_write_iter",
            "vfs_write",
            "ksys_write",
            "do_syscall_64",
            "entry_SYSCALL_64_after_hwframe",
        ],
        &[
            "_raw_spin_unlock_irqrestore",
            "tcp_write_xmit",
            "__tcp_push_pending_frames",
            "tcp_sendmsg_locked",
            "tcp_sendmsg",
            "sock_write_iter",
            "vfs_write",
            "ksys_write",
            "do_syscall_64",
            "entry_SYSCALL_64_after_hwframe",
        ],
        &[
            "__dev_queue_xmit",
            "br_dev_queue_push_xmit",
            "br_nf_post_routing",
            "nf_hook_slow",
            "br_forward_finish",
            "br_nf_hook_thresh",
            "br_nf_forward_finish",
            "br_nf_forward_ip.part.0",
            "nf_hook_slow",
            "__br_forward",
            "br_handle_frame_finish",
            "br_nf_hook_thresh",
            "br_nf_pre_routing_finish",
            "br_nf_pre_routing",
            "br_handle_frame",
            "__netif_receive_skb_core.constprop.0",
            "__netif_receive_skb_one_core",
            "process_backlog",
            "__napi_poll",
            "net_rx_action",
            "handle_softirqs",
            "do_softirq.part.0",
            "__local_bh_enable_ip",
            "__dev_queue_xmit",
            "ip_finish_output2",
            "ip_output",
            "__ip_queue_xmit",
            "__tcp_transmit_skb",
            "tcp_write_xmit",
            "tcp_sendmsg_locked",
            "tcp_sendmsg",
            "sock_write_iter",
            "vfs_write",
            "ksys_write",
            "do_syscall_64",
            "entry_SYSCALL_64_after_hwframe",
        ],
        &[
            "_raw_spin_unlock_irqrestore",
            "enqueue_to_backlog",
            "netif_rx_internal",
            "__netif_rx",
            "veth_xmit",
            "dev_hard_start_xmit",
            "__dev_queue_xmit",
            "ip_finish_output2",
            "ip_output",
            "__ip_queue_xmit",
            "__tcp_transmit_skb",
            "tcp_write_xmit",
            "tcp_sendmsg_locked",
            "tcp_sendmsg",
            "sock_write_iter",
            "vfs_write",
            "ksys_write",
            "do_syscall_64",
            "entry_SYSCALL_64_after_hwframe",
        ],
    ];

    #[test]
    fn recorded_stacks_under_each_view() {
        let expected: [(&[&str], &[&str], &[&str]); 4] = [
            (&["veth"], &["veth"], &["veth"]),
            (&["other.tcp"], &["other.tcp"], &["other.tcp"]),
            // The bridge's hand-off to the port's transmit queue is the device layer's.
            (
                &["other.netdev"],
                &["other.netdev"],
                &["bridge", "netfilter.bridge", "netfilter.hook"],
            ),
            // The veth's hand-off to the peer's backlog, sampled on its interrupt-enable.
            (&["other.netdev"], &["other.netdev"], &["veth"]),
        ];
        for (frames, (layer, leaf, children)) in RECORDED.iter().zip(expected) {
            assert_eq!(charged(frames, View::Layer), layer, "{frames:?}");
            assert_eq!(charged(frames, View::Leaf), leaf, "{frames:?}");
            assert_eq!(charged(frames, View::Children), children, "{frames:?}");
        }
    }

    #[test]
    fn contexts_from_the_first_entry_outward() {
        let context = |frames: &[&str]| context_of(&stack(frames));
        assert_eq!(
            context(&[
                "br_forward",
                "net_rx_action",
                "handle_softirqs",
                "irq_exit_rcu"
            ]),
            ExecContext::SoftIrq
        );
        assert_eq!(
            context(&[
                "br_forward",
                "net_rx_action",
                "handle_softirqs",
                "run_ksoftirqd"
            ]),
            ExecContext::Ksoftirqd
        );
        assert_eq!(
            context(&["veth_poll", "__napi_poll", "napi_threaded_poll", "kthread"]),
            ExecContext::Ksoftirqd
        );
        assert_eq!(
            context(&[
                "e1000_intr",
                "__handle_irq_event_percpu",
                "common_interrupt"
            ]),
            ExecContext::HardIrq
        );
        // The recorded stack: a softirq run at local_bh_enable in a system call.
        assert_eq!(context(RECORDED[2]), ExecContext::SoftIrq);
        assert_eq!(context(RECORDED[0]), ExecContext::Process);
        assert_eq!(context(&["br_forward"; STACK_DEPTH]), ExecContext::Unknown);
    }

    #[test]
    fn idle_and_user_samples() {
        let mut idle = stack(&["default_idle", "do_idle"]);
        idle.flags = SAMPLE_FLAG_IDLE_TASK;
        assert_eq!(attribute(&idle, Rule::default()), None);
        // A softirq so deep on the idle task that its entry frames were cut is busy.
        let mut deep = stack(&["br_forward"; STACK_DEPTH]);
        deep.flags = SAMPLE_FLAG_IDLE_TASK;
        assert_eq!(
            attribute(&deep, Rule::default()).unwrap().classes,
            ["bridge"]
        );
        let mut user = stack(&[]);
        user.flags = SAMPLE_FLAG_USER;
        assert_eq!(
            attribute(&user, Rule::default()).unwrap().classes,
            [OTHER_USER]
        );
    }
}
