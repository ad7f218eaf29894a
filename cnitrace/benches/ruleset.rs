//! Ruleset parse and walk at kube-proxy scale: 5000 Services with 4 endpoints each in
//! iptables mode (KUBE-SERVICES -> KUBE-SVC-* -> KUBE-SEP-*) plus 1000 policy chains, about
//! 26k chains and 100k rules, as iptables-save text and as `nft -j` JSON. Prints the time of
//! each step a window takes twice (read at open and close) and once (difference, walk).
//!
//! `cargo bench -p cnitrace --bench ruleset`.

use std::{fmt::Write as _, time::Instant};

use cnitrace::netfilter::{
    hooks::{Family, Hook},
    ruleset::{self, Backend, Ruleset},
};

const SERVICES: usize = 5000;
const ENDPOINTS: usize = 4;
const POLICY_CHAINS: usize = 1000;
const RULES_PER_POLICY: usize = 30;

fn iptables_save(round: u64) -> String {
    let mut s = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    for svc in 0..SERVICES {
        let _ = writeln!(s, ":KUBE-SVC-{svc:016X} - [0:0]");
        for ep in 0..ENDPOINTS {
            let _ = writeln!(s, ":KUBE-SEP-{svc:012X}{ep:04X} - [0:0]");
        }
    }
    let _ = writeln!(s, "[{round}:0] -A PREROUTING -j KUBE-SERVICES");
    let _ = writeln!(s, "[0:0] -A OUTPUT -j KUBE-SERVICES");
    let _ = writeln!(
        s,
        "[0:0] -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000"
    );
    for svc in 0..SERVICES {
        let (a, b) = (svc / 250, svc % 250);
        let hits = if svc == SERVICES - 1 { round } else { 0 };
        let _ = writeln!(
            s,
            "[{hits}:0] -A KUBE-SERVICES -d 10.96.{a}.{b}/32 -p tcp -m comment --comment \"ns/svc-{svc}:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-{svc:016X}"
        );
        for ep in 0..ENDPOINTS {
            let _ = writeln!(
                s,
                "[0:0] -A KUBE-SVC-{svc:016X} -m comment --comment \"ns/svc-{svc}:http -> 10.244.{a}.{ep}:8080\" -m statistic --mode random --probability 0.25000000000 -j KUBE-SEP-{svc:012X}{ep:04X}"
            );
        }
        let _ = writeln!(
            s,
            "[0:0] -A KUBE-SVC-{svc:016X} ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ"
        );
        for ep in 0..ENDPOINTS {
            let _ = writeln!(
                s,
                "[0:0] -A KUBE-SEP-{svc:012X}{ep:04X} -s 10.244.{a}.{ep}/32 -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(
                s,
                "[0:0] -A KUBE-SEP-{svc:012X}{ep:04X} -p tcp -m tcp -j DNAT --to-destination 10.244.{a}.{ep}:8080"
            );
        }
    }
    s.push_str(
        "COMMIT\n*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n",
    );
    for chain in 0..POLICY_CHAINS {
        let _ = writeln!(s, ":POLICY-{chain:05} - [0:0]");
    }
    for chain in 0..POLICY_CHAINS {
        let _ = writeln!(
            s,
            "[0:0] -A FORWARD -s 10.245.{}.0/24 -j POLICY-{chain:05}",
            chain % 250
        );
        for rule in 0..RULES_PER_POLICY {
            let _ = writeln!(
                s,
                "[0:0] -A POLICY-{chain:05} -s 10.{}.{}.0/24 -p tcp --dport {} -j DROP",
                1 + rule,
                chain % 250,
                1000 + rule
            );
        }
        let _ = writeln!(s, "[0:0] -A POLICY-{chain:05} -j RETURN");
    }
    s.push_str("COMMIT\n");
    s
}

/// The same shape as native nftables JSON (one table, a chain per Service and endpoint).
fn nft_json(round: u64) -> String {
    let mut items = vec![
        serde_json::json!({"table": {"family": "ip", "name": "kube-proxy"}}),
        serde_json::json!({"chain": {"family": "ip", "table": "kube-proxy", "name": "nat-prerouting", "hook": "prerouting"}}),
        serde_json::json!({"chain": {"family": "ip", "table": "kube-proxy", "name": "services"}}),
    ];
    items.push(serde_json::json!({"rule": {"family": "ip", "table": "kube-proxy", "chain": "nat-prerouting",
        "expr": [{"counter": {"packets": round, "bytes": 0}}, {"jump": {"target": "services"}}]}}));
    for svc in 0..SERVICES {
        let chain = format!("service-{svc}");
        items.push(
            serde_json::json!({"chain": {"family": "ip", "table": "kube-proxy", "name": chain}}),
        );
        items.push(serde_json::json!({"rule": {"family": "ip", "table": "kube-proxy", "chain": "services",
            "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": format!("10.96.{}.{}", svc / 250, svc % 250)}},
                     {"counter": {"packets": 0, "bytes": 0}}, {"jump": {"target": chain}}]}}));
        for ep in 0..ENDPOINTS {
            let endpoint = format!("endpoint-{svc}-{ep}");
            items.push(serde_json::json!({"chain": {"family": "ip", "table": "kube-proxy", "name": endpoint}}));
            items.push(serde_json::json!({"rule": {"family": "ip", "table": "kube-proxy", "chain": chain,
                "expr": [{"counter": {"packets": 0, "bytes": 0}}, {"goto": {"target": endpoint}}]}}));
            items.push(serde_json::json!({"rule": {"family": "ip", "table": "kube-proxy", "chain": endpoint,
                "expr": [{"counter": {"packets": 0, "bytes": 0}}, {"dnat": {"addr": format!("10.244.0.{ep}"), "port": 8080}}]}}));
        }
    }
    serde_json::json!({"nftables": items}).to_string()
}

fn timed<T>(what: &str, work: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = work();
    println!(
        "  {what:<44} {:>8.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    out
}

fn main() {
    let (before_text, after_text) = (iptables_save(1000), iptables_save(3000));
    let chains = before_text.lines().filter(|l| l.starts_with(':')).count();
    let rules = before_text.lines().filter(|l| l.contains(" -A ")).count();
    println!(
        "iptables-save: {chains} chains, {rules} rules, {:.1} MB",
        before_text.len() as f64 / 1e6
    );
    let started = Instant::now();
    let parse = |text: &str| Ruleset {
        tables: ruleset::parse_iptables_save(text, Backend::IptablesLegacy, Family::Ipv4)
            .expect("parses"),
    };
    let before = timed("parse (window open)", || parse(&before_text));
    let after = timed("parse (window close)", || parse(&after_text));
    let (diff, changed) = timed("difference of the two", || after.since(&before));
    let walks = timed("walk of every base chain", || {
        ruleset::walk("host", &diff, changed, &|_: Family, _: Hook| None)
    });
    println!(
        "  {:<44} {:>8.1} ms",
        "iptables window in all",
        started.elapsed().as_secs_f64() * 1e3
    );
    let prerouting = walks
        .iter()
        .find(|w| w.hook == "PREROUTING")
        .expect("PREROUTING walk");
    println!(
        "  nat PREROUTING: {} chains reachable ({} listed), {} rules, {:?} evaluations by {:?} packets",
        prerouting.chain_count,
        prerouting.chains.len(),
        prerouting.rules,
        prerouting.rules_evaluated,
        prerouting.packets
    );

    let (before_json, after_json) = (nft_json(1000), nft_json(3000));
    println!("nft -j: {:.1} MB", before_json.len() as f64 / 1e6);
    let started = Instant::now();
    let parse = |text: &str| Ruleset {
        tables: ruleset::parse_nft_json(text, &[]).expect("parses"),
    };
    let before = timed("parse (window open)", || parse(&before_json));
    let after = timed("parse (window close)", || parse(&after_json));
    let (diff, changed) = timed("difference of the two", || after.since(&before));
    let walks = timed("walk of every base chain", || {
        ruleset::walk("host", &diff, changed, &|_: Family, _: Hook| Some(2000))
    });
    println!(
        "  {:<44} {:>8.1} ms",
        "nft window in all",
        started.elapsed().as_secs_f64() * 1e3
    );
    let walk = &walks[0];
    println!(
        "  prerouting: {} chains reachable, {} rules, {:?} evaluations by {:?} packets",
        walk.chain_count, walk.rules, walk.rules_evaluated, walk.packets
    );
}
