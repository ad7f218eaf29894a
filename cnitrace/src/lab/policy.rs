//! Calico's forwarding path in iptables: the chain structure Calico programs (cali-FORWARD,
//! host-endpoint and workload dispatch chains, per-endpoint from/to chains with the conntrack
//! shortcut, the namespace profiles) for every Calico model, and for calico-wp a policy
//! chain on every endpoint: about 17 rules on an intra-host path and about 46 across the two
//! hosts, as Calico's own tables show for one allow policy.

use std::fmt::Write as _;

use crate::error::Error;

/// The `iptables-restore` input for a host with the pods `letters` on it; with `policy`, an
/// allow policy on every endpoint (calico-wp).
pub fn calico_ruleset(letters: &[char], policy: bool) -> String {
    let mut chains = vec![
        "cali-FORWARD".to_owned(),
        "cali-from-hep-forward".to_owned(),
        "cali-to-hep-forward".to_owned(),
        "cali-from-wl-dispatch".to_owned(),
        "cali-to-wl-dispatch".to_owned(),
        "cali-cidr-block".to_owned(),
        "cali-pro-kns.default".to_owned(),
        "cali-pri-kns.default".to_owned(),
    ];
    if policy {
        chains.push("cali-pi-default.allow-bench".to_owned());
    }
    for letter in letters {
        chains.push(format!("cali-fw-cali{letter}"));
        chains.push(format!("cali-tw-cali{letter}"));
    }
    let mut out =
        String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    for chain in &chains {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    let rules: &[&str] = &[
        "-A FORWARD -m comment --comment \"cali:wUHhoiAYhphO9Mso\" -j cali-FORWARD",
        "-A cali-FORWARD -m comment --comment \"cali:vjrMJCRpqwy5oRoX\" -j MARK --set-xmark 0x0/0xe0000",
        "-A cali-FORWARD -m comment --comment \"cali:A_sPAO0mcxbT9mOV\" -m mark --mark 0x0/0x10000 -j cali-from-hep-forward",
        "-A cali-FORWARD -i cali+ -m comment --comment \"cali:8ZoYfO5HKXWbB3pk\" -j cali-from-wl-dispatch",
        "-A cali-FORWARD -o cali+ -m comment --comment \"cali:jdEuaPBe14V2hutn\" -j cali-to-wl-dispatch",
        "-A cali-FORWARD -m comment --comment \"cali:12bc6HljsMKsmfr-\" -j cali-to-hep-forward",
        "-A cali-FORWARD -m comment --comment \"cali:NOSxoaGx8OIstr1z\" -j cali-cidr-block",
        "-A cali-from-hep-forward -i wire -m conntrack --ctstate INVALID -j DROP",
        "-A cali-from-hep-forward -i wire -m conntrack --ctstate RELATED,ESTABLISHED -j MARK --set-xmark 0x10000/0x10000",
        "-A cali-from-hep-forward -i wire -p udp -m udp --dport 4789 -j DROP",
        "-A cali-from-hep-forward -i wire -j MARK --set-xmark 0x0/0x10000",
        "-A cali-to-hep-forward -o wire -m conntrack --ctstate INVALID -j DROP",
        "-A cali-to-hep-forward -o wire -m mark --mark 0x10000/0x10000 -j RETURN",
        "-A cali-to-hep-forward -o wire -p tcp -m multiport --dports 22,179 -j DROP",
        "-A cali-to-hep-forward -o wire -j MARK --set-xmark 0x0/0x10000",
        "-A cali-pro-kns.default -m comment --comment \"cali:profile\" -j MARK --set-xmark 0x10000/0x10000",
        "-A cali-pro-kns.default -m mark --mark 0x10000/0x10000 -j RETURN",
        "-A cali-pri-kns.default -m comment --comment \"cali:profile\" -j MARK --set-xmark 0x10000/0x10000",
        "-A cali-pri-kns.default -m mark --mark 0x10000/0x10000 -j RETURN",
    ];
    for rule in rules {
        let _ = writeln!(out, "{rule}");
    }
    if policy {
        out.push_str(
            "-A cali-pi-default.allow-bench -p tcp -m multiport --dports 5201,5299,5300 -j MARK --set-xmark 0x10000/0x10000\n\
             -A cali-pi-default.allow-bench -m mark --mark 0x10000/0x10000 -j RETURN\n",
        );
    }
    for letter in letters {
        let _ = writeln!(
            out,
            "-A cali-from-wl-dispatch -i cali{letter} -g cali-fw-cali{letter}"
        );
        let _ = writeln!(
            out,
            "-A cali-to-wl-dispatch -o cali{letter} -g cali-tw-cali{letter}"
        );
    }
    out.push_str("-A cali-from-wl-dispatch -m comment --comment \"Unknown interface\" -j DROP\n");
    out.push_str("-A cali-to-wl-dispatch -m comment --comment \"Unknown interface\" -j DROP\n");
    for letter in letters {
        for (direction, profile) in [
            ("fw", "cali-pro-kns.default"),
            ("tw", "cali-pri-kns.default"),
        ] {
            let chain = format!("cali-{direction}-cali{letter}");
            let mut rules = vec![
                "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".to_owned(),
                "-m conntrack --ctstate INVALID -j DROP".to_owned(),
                "-j MARK --set-xmark 0x0/0x10000".to_owned(),
                "-p udp -m udp --dport 4789 -j DROP".to_owned(),
                "-p ipencap -j DROP".to_owned(),
            ];
            if policy {
                rules.push("-j cali-pi-default.allow-bench".to_owned());
                rules.push("-m mark --mark 0x10000/0x10000 -j RETURN".to_owned());
            }
            rules.extend([
                format!("-j {profile}"),
                "-m mark --mark 0x10000/0x10000 -j RETURN".to_owned(),
                "-m comment --comment \"Drop if no profiles matched\" -j DROP".to_owned(),
            ]);
            for rule in rules {
                let _ = writeln!(out, "-A {chain} {rule}");
            }
        }
    }
    out.push_str("COMMIT\n");
    out
}

/// Installs Calico's forwarding path (and with `policy` the allow policy) in a host
/// namespace with one `iptables-restore`.
pub fn install_calico_policy(host_netns: &str, host: u8, policy: bool) -> Result<(), Error> {
    let letters: &[char] = if host == 1 { &['a', 'b'] } else { &['c'] };
    let rules = calico_ruleset(letters, policy);
    super::load_rules(
        host_netns,
        "iptables-restore",
        &[],
        &rules,
        "Calico's chains",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netfilter::{hooks::Family, ruleset};

    #[test]
    fn the_policy_parses_and_has_the_sizes_of_table_iii() {
        let text = calico_ruleset(&['a', 'b'], true);
        let tables =
            ruleset::parse_iptables_save(&text, ruleset::Backend::IptablesNft, Family::Ipv4)
                .unwrap();
        let rules: usize = tables[0].chains.iter().map(|c| c.rules.len()).sum();
        assert!(
            (40..=80).contains(&rules),
            "{rules} rules on a two-pod host"
        );
        let without = calico_ruleset(&['a', 'b'], false);
        assert!(!without.contains("allow-bench"));
        assert_eq!(
            without.lines().filter(|l| l.starts_with("-A ")).count() + 4 * 2 + 2,
            text.lines().filter(|l| l.starts_with("-A ")).count()
        );
    }
}
