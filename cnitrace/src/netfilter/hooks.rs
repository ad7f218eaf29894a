//! Which netfilter hook a sampled stack was running, read from the frames that called into
//! netfilter (`ip_forward` -> FORWARD, `br_nf_forward_ip` -> FORWARD of IPv4 reached from the
//! bridge, ...). NF_HOOK is inlined into its caller, so the caller of `nf_hook_slow` is the
//! function that owns the hook.

use serde::{Deserialize, Serialize};

use crate::components;

/// Netfilter address families as the report names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Ipv4,
    Ipv6,
    Bridge,
    Arp,
    Unknown,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
            Family::Bridge => "bridge",
            Family::Arp => "arp",
            Family::Unknown => "unknown",
        }
    }
}

/// The five netfilter hooks (the bridge family has the same five).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
pub enum Hook {
    #[serde(rename = "PREROUTING")]
    Prerouting,
    #[serde(rename = "INPUT")]
    Input,
    #[serde(rename = "FORWARD")]
    Forward,
    #[serde(rename = "OUTPUT")]
    Output,
    #[serde(rename = "POSTROUTING")]
    Postrouting,
    #[serde(rename = "unknown")]
    #[value(skip)]
    Unknown,
}

impl Hook {
    pub const ALL: [Hook; 5] = [
        Hook::Prerouting,
        Hook::Input,
        Hook::Forward,
        Hook::Output,
        Hook::Postrouting,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Prerouting => "PREROUTING",
            Hook::Input => "INPUT",
            Hook::Forward => "FORWARD",
            Hook::Output => "OUTPUT",
            Hook::Postrouting => "POSTROUTING",
            Hook::Unknown => "unknown",
        }
    }

    /// The hook of an iptables built-in chain name or an nft `hook` keyword.
    pub fn parse(name: &str) -> Option<Hook> {
        Some(match name.to_ascii_lowercase().as_str() {
            "prerouting" => Hook::Prerouting,
            "input" => Hook::Input,
            "forward" => Hook::Forward,
            "output" => Hook::Output,
            "postrouting" => Hook::Postrouting,
            _ => return None,
        })
    }

    /// The nft keyword (`forward`).
    pub fn nft_name(self) -> &'static str {
        match self {
            Hook::Prerouting => "prerouting",
            Hook::Input => "input",
            Hook::Forward => "forward",
            Hook::Output => "output",
            Hook::Postrouting => "postrouting",
            Hook::Unknown => "unknown",
        }
    }
}

/// Where a sample's netfilter work was: family, hook, and whether an IPv4/IPv6 hook was run by
/// bridge-netfilter on a bridged frame (br_netfilter's `bridge-nf-call-iptables`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HookSite {
    pub family: Family,
    pub hook: Hook,
    pub from_bridge: bool,
}

impl HookSite {
    pub const UNKNOWN: HookSite = HookSite {
        family: Family::Unknown,
        hook: Hook::Unknown,
        from_bridge: false,
    };
}

/// Kernel functions that run a netfilter hook, and which one (Linux 5.10 to 6.18). A function
/// absent from this table is skipped and the next caller out is tried.
const HOOK_CALLERS: &[(&str, Family, Hook, bool)] = &[
    // bridge-netfilter: IPv4/IPv6/ARP hooks run on bridged frames.
    ("br_nf_pre_routing", Family::Ipv4, Hook::Prerouting, true),
    (
        "br_nf_pre_routing_ipv6",
        Family::Ipv6,
        Hook::Prerouting,
        true,
    ),
    ("br_nf_forward_ip", Family::Ipv4, Hook::Forward, true),
    ("br_nf_forward", Family::Ipv4, Hook::Forward, true),
    ("br_nf_forward_arp", Family::Arp, Hook::Forward, true),
    ("br_nf_post_routing", Family::Ipv4, Hook::Postrouting, true),
    // The bridge family's own hooks (ebtables, nft bridge tables, br_netfilter's entry points).
    (
        "br_nf_pre_routing_finish",
        Family::Bridge,
        Hook::Prerouting,
        false,
    ),
    (
        "br_nf_pre_routing_finish_ipv6",
        Family::Bridge,
        Hook::Prerouting,
        false,
    ),
    ("br_nf_forward_finish", Family::Bridge, Hook::Forward, false),
    ("br_handle_frame", Family::Bridge, Hook::Prerouting, false),
    ("br_pass_frame_up", Family::Bridge, Hook::Input, false),
    ("__br_forward", Family::Bridge, Hook::Forward, false),
    (
        "br_forward_finish",
        Family::Bridge,
        Hook::Postrouting,
        false,
    ),
    ("br_dev_xmit", Family::Bridge, Hook::Output, false),
    // IPv4.
    ("ip_rcv", Family::Ipv4, Hook::Prerouting, false),
    ("ip_list_rcv", Family::Ipv4, Hook::Prerouting, false),
    ("ip_sublist_rcv", Family::Ipv4, Hook::Prerouting, false),
    ("ip_local_deliver", Family::Ipv4, Hook::Input, false),
    ("ip_forward", Family::Ipv4, Hook::Forward, false),
    ("__ip_local_out", Family::Ipv4, Hook::Output, false),
    ("ip_local_out", Family::Ipv4, Hook::Output, false),
    ("ip_output", Family::Ipv4, Hook::Postrouting, false),
    ("ip_mc_output", Family::Ipv4, Hook::Postrouting, false),
    // IPv6.
    ("ipv6_rcv", Family::Ipv6, Hook::Prerouting, false),
    ("ipv6_list_rcv", Family::Ipv6, Hook::Prerouting, false),
    ("ip6_sublist_rcv", Family::Ipv6, Hook::Prerouting, false),
    ("ip6_input", Family::Ipv6, Hook::Input, false),
    ("ip6_forward", Family::Ipv6, Hook::Forward, false),
    ("__ip6_local_out", Family::Ipv6, Hook::Output, false),
    ("ip6_output", Family::Ipv6, Hook::Postrouting, false),
    // ARP.
    ("arp_rcv", Family::Arp, Hook::Input, false),
];

/// The hook of a sample attributed to netfilter: the first hook-running function among the
/// callers of the innermost netfilter frame. `None` if no frame is netfilter's; the
/// [`HookSite::UNKNOWN`] site if no caller tells.
pub fn site_of<S: AsRef<str>>(frames: &[S]) -> Option<HookSite> {
    let innermost = frames.iter().position(|f| {
        components::classify(f.as_ref()).is_some_and(|c| components::top_level(c) == "netfilter")
    })?;
    let site = frames[innermost + 1..].iter().find_map(|frame| {
        let name = components::base_name(frame.as_ref());
        HOOK_CALLERS
            .iter()
            .find(|(caller, ..)| *caller == name)
            .map(|&(_, family, hook, from_bridge)| HookSite {
                family,
                hook,
                from_bridge,
            })
    });
    Some(site.unwrap_or(HookSite::UNKNOWN))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::unnecessary_wraps)] // compared with site_of's return value
    fn site(family: Family, hook: Hook, from_bridge: bool) -> Option<HookSite> {
        Some(HookSite {
            family,
            hook,
            from_bridge,
        })
    }

    #[test]
    fn rule_evaluation_on_a_bridged_frame_is_ipv4_forward_from_the_bridge() {
        // Recorded on this machine (perf script, 6.18): a bridged pod-to-pod packet.
        let frames = [
            "ipt_do_table",
            "nf_hook_slow",
            "br_nf_forward_ip.part.0",
            "nf_hook_slow",
            "__br_forward",
            "br_handle_frame_finish",
            "br_nf_hook_thresh",
            "br_nf_pre_routing_finish",
            "br_nf_pre_routing",
            "br_handle_frame",
        ];
        assert_eq!(site_of(&frames), site(Family::Ipv4, Hook::Forward, true));
    }

    #[test]
    fn glue_code_belongs_to_the_bridge_hook_that_runs_it() {
        let frames = ["br_nf_forward_ip.part.0", "nf_hook_slow", "__br_forward"];
        assert_eq!(site_of(&frames), site(Family::Bridge, Hook::Forward, false));
        let frames = ["nf_conntrack_in", "nf_hook_slow", "br_nf_pre_routing"];
        assert_eq!(site_of(&frames), site(Family::Ipv4, Hook::Prerouting, true));
    }

    #[test]
    fn routed_paths() {
        let forward = [
            "ipt_do_table",
            "nf_hook_slow",
            "ip_forward",
            "ip_rcv_finish",
            "ip_rcv",
        ];
        assert_eq!(site_of(&forward), site(Family::Ipv4, Hook::Forward, false));
        let post = [
            "nf_nat_ipv4_out",
            "nf_hook_slow",
            "ip_output",
            "ip_forward_finish",
        ];
        assert_eq!(site_of(&post), site(Family::Ipv4, Hook::Postrouting, false));
        let v6 = ["nft_do_chain", "nf_hook_slow", "ip6_forward"];
        assert_eq!(site_of(&v6), site(Family::Ipv6, Hook::Forward, false));
        let out = [
            "nf_conntrack_in",
            "nf_hook_slow",
            "__ip_local_out",
            "ip_queue_xmit",
        ];
        assert_eq!(site_of(&out), site(Family::Ipv4, Hook::Output, false));
    }

    #[test]
    fn unknown_callers_and_non_netfilter_stacks() {
        assert_eq!(
            site_of(&["nf_conntrack_in", "some_driver"]),
            Some(HookSite::UNKNOWN)
        );
        assert_eq!(site_of(&["br_forward", "br_handle_frame"]), None);
        assert_eq!(site_of::<&str>(&[]), None);
    }

    #[test]
    fn hook_names_round_trip() {
        for hook in Hook::ALL {
            assert_eq!(Hook::parse(hook.as_str()), Some(hook));
            assert_eq!(Hook::parse(hook.nft_name()), Some(hook));
        }
        assert_eq!(Hook::parse("ingress"), None);
    }
}
