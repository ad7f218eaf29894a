//! Kubernetes Services in the lab: N ClusterIP Services in the shape kube-proxy gives them on
//! a node, in its iptables mode (KUBE-SERVICES -> KUBE-SVC-* -> KUBE-SEP-*, one rule per
//! Service IP and port walked by the first packet of every connection) or its nftables mode
//! (one verdict-map lookup), installed in one `iptables-restore` or `nft -f` per host.

use std::{fmt::Write as _, net::Ipv4Addr};

use serde::Serialize;

use super::topology::Lab;
use crate::{error::Error, netns};

/// How Services are implemented on the lab's hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ProxyMode {
    /// kube-proxy's iptables mode (the default of most clusters).
    Iptables,
    /// kube-proxy's nftables mode (Kubernetes 1.31+).
    Nftables,
    /// No Service rules (a CNI that replaces kube-proxy, or none wanted).
    None,
}

impl ProxyMode {
    pub fn name(self) -> &'static str {
        match self {
            ProxyMode::Iptables => "iptables",
            ProxyMode::Nftables => "nftables",
            ProxyMode::None => "none",
        }
    }
}

/// The port every lab Service listens on, and the pods' port behind it (the connect-
/// request-response server's).
pub const SERVICE_PORT: u16 = 80;
/// Most Services a lab takes (a /16 of Service IPs).
pub const MAX_SERVICES: u32 = 60_000;
/// The Service in front of the iperf3 server of the target pod (port 5201).
pub const STREAM_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 255, 20);
/// The pods' network (kube-proxy's `--cluster-cidr`): traffic from outside it is masqueraded.
const CLUSTER_CIDR: &str = "10.77.0.0/16";

/// The ClusterIP of Service `index`: 10.96.0.0/16, skipping .0 and .255.
pub fn service_ip(index: u32) -> Ipv4Addr {
    let n = index % MAX_SERVICES;
    Ipv4Addr::new(10, 96, (n / 250) as u8, (n % 250 + 1) as u8)
}

/// One Service: its IP and its endpoints (pod IP, port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub ip: Ipv4Addr,
    /// `tcp` or `udp`.
    pub protocol: &'static str,
    pub port: u16,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

/// `count` Services. Every one but the last has two endpoints (the lab's two server pods);
/// the last, which the lab's traffic connects to, has only `target`: created last, it is the
/// last rule of KUBE-SERVICES, so in iptables mode a new connection to it walks them all (the
/// worst case; a random Service walks half).
pub fn services(count: u32, others: [Ipv4Addr; 2], target: Ipv4Addr, port: u16) -> Vec<Service> {
    (0..count)
        .map(|i| Service {
            name: format!("lab/svc-{i}"),
            ip: service_ip(i),
            protocol: "tcp",
            port: SERVICE_PORT,
            endpoints: if i + 1 == count {
                vec![(target, port)]
            } else {
                vec![(others[0], port), (others[1], port)]
            },
        })
        .collect()
}

/// kube-proxy's chain name suffix: a stable hash of what the chain is for (kube-proxy uses 16
/// base32 characters of a SHA-256; any stable 16 characters serve here).
pub(crate) fn chain_hash(what: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    // FNV-1a, then base32 (RFC 4648 alphabet) of 80 bits.
    let mut hash: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for byte in what.bytes() {
        hash ^= u128::from(byte);
        hash = hash.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
    }
    (0..16)
        .map(|i| ALPHABET[((hash >> (i * 5)) & 31) as usize] as char)
        .collect()
}

/// The iptables-restore input kube-proxy's iptables mode would write for these Services
/// (nat and filter tables; the jumps from the base chains included).
pub fn iptables_rules(services: &[Service]) -> String {
    let mut nat = String::from("*nat\n");
    let mut chains = vec![
        "KUBE-SERVICES".to_owned(),
        "KUBE-POSTROUTING".to_owned(),
        "KUBE-MARK-MASQ".to_owned(),
        "KUBE-NODEPORTS".to_owned(),
    ];
    let mut rules = String::new();
    rules.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    );
    let mut per_service = String::new();
    for service in services {
        let svc = format!("KUBE-SVC-{}", chain_hash(&service.name));
        chains.push(svc.clone());
        let (ip, name, proto, port) = (service.ip, &service.name, service.protocol, service.port);
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {ip}/32 -p {proto} -m comment --comment \"{name} cluster IP\" -m {proto} --dport {port} -j {svc}"
        );
        let _ = writeln!(
            per_service,
            "-A {svc} ! -s {CLUSTER_CIDR} -d {ip}/32 -p {proto} -m comment --comment \"{name} cluster IP\" -m {proto} --dport {port} -j KUBE-MARK-MASQ"
        );
        let count = service.endpoints.len();
        for (i, &(ip, port)) in service.endpoints.iter().enumerate() {
            let sep = format!(
                "KUBE-SEP-{}",
                chain_hash(&format!("{}/{ip}:{port}", service.name))
            );
            chains.push(sep.clone());
            // Endpoint i of n is taken with probability 1/(n-i) of what the earlier left.
            let probability = if i + 1 < count {
                format!(
                    " -m statistic --mode random --probability {:.11}",
                    1.0 / (count - i) as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                per_service,
                "-A {svc} -m comment --comment \"{} -> {ip}:{port}\"{probability} -j {sep}",
                service.name
            );
            let _ = writeln!(
                per_service,
                "-A {sep} -s {ip}/32 -m comment --comment \"{}\" -j KUBE-MARK-MASQ\n\
                 -A {sep} -p {proto} -m comment --comment \"{}\" -m {proto} -j DNAT --to-destination {ip}:{port}",
                service.name,
                service.name,
                proto = service.protocol
            );
        }
    }
    rules.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    for chain in &chains {
        let _ = writeln!(nat, ":{chain} - [0:0]");
    }
    nat.push_str(&rules);
    nat.push_str(&per_service);
    nat.push_str("COMMIT\n");
    nat.push_str(
        "*filter\n\
         :KUBE-FORWARD - [0:0]\n\
         :KUBE-SERVICES - [0:0]\n\
         :KUBE-EXTERNAL-SERVICES - [0:0]\n\
         :KUBE-PROXY-FIREWALL - [0:0]\n\
         :KUBE-NODEPORTS - [0:0]\n\
         -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
         -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         COMMIT\n",
    );
    nat
}

/// The `nft -f` input kube-proxy's nftables mode would write for these Services: one table,
/// a verdict map from (IP, protocol, port) to a chain per Service, `numgen` over endpoints.
/// The base chains' jumps carry counters, so the walk knows how many packets entered.
pub fn nftables_rules(services: &[Service]) -> String {
    let mut out = String::from(
        "table ip kube-proxy {\n\
         \tchain mark-for-masquerade { meta mark set meta mark | 0x4000; }\n\
         \tchain masquerading {\n\
         \t\tmeta mark & 0x4000 == 0 return\n\
         \t\tmeta mark set meta mark ^ 0x4000\n\
         \t\tmasquerade fully-random\n\
         \t}\n\
         \tchain nat-prerouting { type nat hook prerouting priority -100; policy accept; counter jump services; }\n\
         \tchain nat-output { type nat hook output priority -100; policy accept; counter jump services; }\n\
         \tchain nat-postrouting { type nat hook postrouting priority 100; policy accept; jump masquerading; }\n\
         \tchain filter-forward { type filter hook forward priority -110; policy accept; ct state invalid drop; }\n",
    );
    let mut map_elements = Vec::with_capacity(services.len());
    for service in services {
        let hash = chain_hash(&service.name);
        let chain = format!("service-{hash}");
        let _ = writeln!(out, "\tchain {chain} {{");
        let _ = writeln!(
            out,
            "\t\tip daddr {} {} dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
            service.ip, service.protocol, service.port
        );
        let endpoint_chains: Vec<String> = service
            .endpoints
            .iter()
            .map(|(ip, port)| {
                format!(
                    "endpoint-{}",
                    chain_hash(&format!("{}/{ip}:{port}", service.name))
                )
            })
            .collect();
        let verdicts: Vec<String> = endpoint_chains
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{i} : goto {c}"))
            .collect();
        let _ = writeln!(
            out,
            "\t\tnumgen random mod {} vmap {{ {} }}\n\t}}",
            endpoint_chains.len(),
            verdicts.join(", ")
        );
        for (chain, (ip, port)) in endpoint_chains.iter().zip(&service.endpoints) {
            let _ = writeln!(
                out,
                "\tchain {chain} {{\n\t\tip saddr {ip} jump mark-for-masquerade\n\t\tmeta l4proto {} dnat to {ip}:{port}\n\t}}",
                service.protocol
            );
        }
        map_elements.push(format!(
            "{} . {} . {} : goto {chain}",
            service.ip, service.protocol, service.port
        ));
    }
    out.push_str("\tmap service-ips {\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n");
    if !map_elements.is_empty() {
        let _ = writeln!(out, "\t\telements = {{ {} }}", map_elements.join(", "));
    }
    out.push_str("\t}\n\tchain services {\n\t\tip daddr . meta l4proto . th dport vmap @service-ips\n\t}\n}\n");
    out
}

/// Rules (not chains) in an iptables-restore input or an nft script.
pub fn rule_count(mode: ProxyMode, rules: &str) -> usize {
    match mode {
        ProxyMode::Iptables => rules.lines().filter(|l| l.starts_with("-A ")).count(),
        // Statements inside chains, one per line or `;`-separated after the chain's type.
        ProxyMode::Nftables => rules
            .lines()
            .map(str::trim)
            .filter(|l| {
                !l.starts_with("table")
                    && !l.starts_with("map")
                    && !l.starts_with("type ipv4_addr")
                    && !l.starts_with("elements")
                    && *l != "}"
            })
            .map(|l| {
                if let Some(body) = l.strip_prefix("chain ") {
                    // `chain x { type ...; policy accept; rule; }` or `chain x { rule }`.
                    let inner = body
                        .split_once('{')
                        .map_or("", |(_, b)| b)
                        .trim_end_matches('}');
                    inner
                        .split(';')
                        .map(str::trim)
                        .filter(|s| {
                            !s.is_empty() && !s.starts_with("type ") && !s.starts_with("policy ")
                        })
                        .count()
                } else {
                    1
                }
            })
            .sum(),
        ProxyMode::None => 0,
    }
}

/// What a `--services` installation did.
#[derive(Debug, Clone, Serialize)]
pub struct Installed {
    pub mode: ProxyMode,
    pub services: u32,
    /// Rules per host.
    pub rules: usize,
    /// The Service the lab's traffic connects to.
    pub target: Ipv4Addr,
    pub seconds: f64,
}

/// Installs `count` Services on both hosts of the lab (replacing any installed before), in
/// one iptables-restore or nft -f per host. `target` is the pod behind the last Service.
pub fn install(
    lab: &Lab,
    mode: ProxyMode,
    count: u32,
    target: Ipv4Addr,
    port: u16,
) -> Result<Installed, Error> {
    if count > MAX_SERVICES {
        return Err(Error::InvalidArgument(format!(
            "--services {count} is too many: at most {MAX_SERVICES}"
        )));
    }
    let started = std::time::Instant::now();
    let others = [lab.pods[1].ip, lab.pods[2].ip];
    // The cluster's own Services first, the stream's, then the lab's (the last one is the
    // connection target).
    let mut list = super::node_rules::default_services(others);
    list.push(Service {
        name: "lab/stream".to_owned(),
        ip: STREAM_SERVICE_IP,
        protocol: "tcp",
        port: super::traffic::IPERF3_PORT,
        endpoints: vec![(target, super::traffic::IPERF3_PORT)],
    });
    list.extend(services(count, others, target, port));
    let mut rules = 0;
    let (program, args, text) = match mode {
        ProxyMode::None => ("", vec![], String::new()),
        ProxyMode::Iptables => ("iptables-restore", vec!["--noflush"], iptables_rules(&list)),
        ProxyMode::Nftables => ("nft", vec!["-f", "-"], nftables_rules(&list)),
    };
    if mode != ProxyMode::None {
        rules = rule_count(mode, &text);
    }
    // Both hosts at once: a large iptables-restore is CPU-bound for minutes.
    std::thread::scope(|scope| {
        let workers: Vec<_> = [lab.host_netns(1), lab.host_netns(2)]
            .into_iter()
            .map(|host| {
                let (args, text) = (&args, &text);
                scope.spawn(move || -> Result<(), Error> {
                    remove(&host)?;
                    if mode == ProxyMode::None {
                        return Ok(());
                    }
                    run_with_input(&host, program, args, text)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join().unwrap_or_else(|_| {
                    Err(Error::InvalidArgument(
                        "Service installer panicked".to_owned(),
                    ))
                })
            })
            .collect::<Result<Vec<()>, Error>>()
    })?;
    Ok(Installed {
        mode,
        services: count,
        rules,
        target: if count > 0 {
            service_ip(count - 1)
        } else {
            target
        },
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn run_with_input(host: &str, program: &str, args: &[&str], input: &str) -> Result<(), Error> {
    super::load_rules(host, program, args, input, "Services in the lab")
}

/// kube-proxy's chains (kubelet's KUBE-FIREWALL and the CNIs' chains are left alone).
fn is_kube_proxy_chain(chain: &str) -> bool {
    matches!(
        chain,
        "KUBE-SERVICES"
            | "KUBE-POSTROUTING"
            | "KUBE-MARK-MASQ"
            | "KUBE-NODEPORTS"
            | "KUBE-FORWARD"
            | "KUBE-EXTERNAL-SERVICES"
            | "KUBE-PROXY-FIREWALL"
    ) || chain.starts_with("KUBE-SVC-")
        || chain.starts_with("KUBE-SEP-")
}

/// Removes kube-proxy's rules of either mode from a host namespace (nothing if none).
pub fn remove(host: &str) -> Result<(), Error> {
    // nftables mode: its own table.
    let _ = netns::output_in(
        Some(host),
        "nft",
        &["delete", "table", "ip", "kube-proxy"],
        None,
    )?;
    // iptables mode: the nat and filter tables written back without kube-proxy's chains and
    // the jumps to them, in one restore that replaces just those two tables (deleting tens
    // of thousands of chains one by one takes minutes with iptables-nft).
    let Some(saved) = netns::output_in(Some(host), "iptables-save", &[], None)? else {
        return Ok(());
    };
    let text = String::from_utf8_lossy(&saved.stdout);
    match without_kube_proxy(&text) {
        Some(script) => run_with_input(host, "iptables-restore", &[], &script),
        None => Ok(()),
    }
}

/// The nat and filter tables of an iptables-save text without kube-proxy's chains, rules and
/// jumps; `None` when it has none of them.
fn without_kube_proxy(saved: &str) -> Option<String> {
    let mut out = String::new();
    let mut keep = false;
    let mut found = false;
    for line in saved.lines() {
        if let Some(name) = line.strip_prefix('*') {
            keep = name == "nat" || name == "filter";
        }
        if !keep {
            continue;
        }
        let chain = line
            .strip_prefix(':')
            .or_else(|| line.strip_prefix("-A "))
            .and_then(|rest| rest.split_whitespace().next());
        let target = line
            .strip_prefix("-A ")
            .and_then(|rule| rule.rsplit_once("-j "))
            .and_then(|(_, t)| t.split_whitespace().next());
        if chain.is_some_and(is_kube_proxy_chain) || target.is_some_and(is_kube_proxy_chain) {
            found = true;
            continue;
        }
        // Counters are not written back.
        let line = match line.strip_prefix(':') {
            Some(decl) => {
                let mut parts = decl.split_whitespace();
                format!(
                    ":{} {} [0:0]",
                    parts.next().unwrap_or_default(),
                    parts.next().unwrap_or("-")
                )
            }
            None => line.to_owned(),
        };
        out.push_str(&line);
        out.push('\n');
    }
    found.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(count: u32) -> Vec<Service> {
        services(
            count,
            [Ipv4Addr::new(10, 77, 1, 3), Ipv4Addr::new(10, 77, 2, 2)],
            Ipv4Addr::new(10, 77, 1, 3),
            5300,
        )
    }

    #[test]
    fn service_ips_are_distinct_and_valid() {
        let ips: std::collections::HashSet<Ipv4Addr> = (0..MAX_SERVICES).map(service_ip).collect();
        assert_eq!(ips.len(), MAX_SERVICES as usize);
        assert!(
            ips.iter()
                .all(|ip| ip.octets()[3] != 0 && ip.octets()[3] != 255)
        );
    }

    #[test]
    fn iptables_mode_has_kube_proxys_shape() {
        let rules = iptables_rules(&list(3));
        // One KUBE-SERVICES rule per Service, the nodeports rule last.
        let services: Vec<&str> = rules
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES "))
            .collect();
        assert_eq!(services.len(), 3 + 1, "3 Services and the nodeports rule");
        assert!(services[3].contains("KUBE-NODEPORTS"));
        assert!(rules.contains("-j DNAT --to-destination 10.77.1.3:5300"));
        assert!(rules.contains("--probability 0.50000000000"));
        // The last Service has one endpoint: no probability rule.
        let last_svc = format!("KUBE-SVC-{}", chain_hash("lab/svc-2"));
        assert!(
            !rules
                .lines()
                .any(|l| l.starts_with(&format!("-A {last_svc} ")) && l.contains("statistic"))
        );
        // Chain names fit iptables' 28 characters and every chain is declared once.
        for line in rules.lines().filter(|l| l.starts_with(':')) {
            let name = line[1..].split_whitespace().next().unwrap();
            assert!(name.len() <= 28, "{name}");
        }
        // Per Service: 1 in KUBE-SERVICES, 1 masquerade mark, per endpoint 1 pick + 2 in SEP.
        let fixed = rule_count(ProxyMode::Iptables, &iptables_rules(&[]));
        assert_eq!(
            rule_count(ProxyMode::Iptables, &rules),
            fixed + 2 * (2 + 2 * 3) + (2 + 3)
        );
    }

    #[test]
    fn nftables_mode_is_one_map_lookup() {
        let rules = nftables_rules(&list(3));
        assert_eq!(rules.matches("vmap @service-ips").count(), 1);
        assert_eq!(rules.matches(". tcp . 80 : goto service-").count(), 3);
        assert!(rules.contains("numgen random mod 2 vmap"));
        assert!(rules.contains("dnat to 10.77.1.3:5300"));
        assert_eq!(rules.matches('{').count(), rules.matches('}').count());
        let empty = nftables_rules(&[]);
        assert!(!empty.contains("elements"));
        assert!(rule_count(ProxyMode::Nftables, &rules) > rule_count(ProxyMode::Nftables, &empty));
    }

    #[test]
    fn removal_keeps_everything_but_kube_proxy() {
        let saved = "*mangle\n:PREROUTING ACCEPT [5:10]\nCOMMIT\n*nat\n:PREROUTING ACCEPT [1:2]\n\
                     :KUBE-SERVICES - [0:0]\n:KUBE-SVC-AAAA - [0:0]\n:FLANNEL-POSTRTG - [0:0]\n\
                     -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
                     -A POSTROUTING -j FLANNEL-POSTRTG\n-A KUBE-SERVICES -d 10.96.0.1/32 -j KUBE-SVC-AAAA\n\
                     COMMIT\n*filter\n:KUBE-FIREWALL - [0:0]\n-A INPUT -j KUBE-FIREWALL\nCOMMIT\n";
        let kept = without_kube_proxy(saved).unwrap();
        assert!(!kept.contains("KUBE-SERVICES") && !kept.contains("KUBE-SVC"));
        assert!(kept.contains("-A POSTROUTING -j FLANNEL-POSTRTG"));
        // kubelet's chain stays; mangle is not rewritten; counters are dropped.
        assert!(kept.contains("-A INPUT -j KUBE-FIREWALL"));
        assert!(!kept.contains("mangle"));
        assert!(kept.contains(":PREROUTING ACCEPT [0:0]"));
        assert_eq!(
            without_kube_proxy("*filter\n-A INPUT -j ACCEPT\nCOMMIT\n"),
            None
        );
    }

    #[test]
    fn chain_hashes_are_stable_and_distinct() {
        assert_eq!(chain_hash("lab/svc-1"), chain_hash("lab/svc-1"));
        let hashes: std::collections::HashSet<String> = (0..10_000)
            .map(|i| chain_hash(&format!("lab/svc-{i}")))
            .collect();
        assert_eq!(hashes.len(), 10_000);
    }
}

/// A Service sweep: for each proxy mode and number of Services, a profiled
/// connect-request-response run to the last Service.
#[derive(Debug, Clone)]
pub struct ServiceSweepOptions {
    pub services: Vec<u32>,
    pub modes: Vec<ProxyMode>,
    pub model: super::topology::Model,
    pub scenario: super::topology::Scenario,
    pub duration_s: f64,
    pub sampler: crate::probe::sampling::ProbeConfig,
    /// A directory for a flame graph per point.
    pub flamegraphs: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServicePoint {
    pub mode: ProxyMode,
    pub services: u32,
    /// Rules kube-proxy's shape puts on each host for them.
    pub rules: usize,
    pub install_s: f64,
    pub crr: super::traffic::CrrResult,
    pub total_cpp: Option<f64>,
    pub netfilter_cpp: Option<f64>,
    /// Netfilter cycles of the window per connection made in it.
    pub netfilter_cycles_per_connection: Option<f64>,
    /// Rule evaluations in the client host's nat PREROUTING walk (KUBE-SERVICES and below in
    /// iptables mode, the kube-proxy table in nftables mode) per connection.
    pub prerouting_rules_per_connection: Option<f64>,
    /// An iperf3 stream through a Service (to the pod without Service rules): established
    /// packets skip the nat table, so its netfilter CPP should not grow with the Services.
    pub stream_gbps: f64,
    pub stream_netfilter_cpp: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModeFit {
    pub mode: ProxyMode,
    /// Netfilter cycles per connection against the number of Services (points with at least
    /// one Service: all of them DNATed).
    pub cycles_per_connection: Option<super::sweep::Fit>,
    /// Connection set-up (p50, microseconds) against the number of Services.
    pub setup_p50_us: Option<super::sweep::Fit>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServiceSweepResult {
    pub model: String,
    pub scenario: String,
    pub points: Vec<ServicePoint>,
    pub fits: Vec<ModeFit>,
}

pub fn validate_sweep(options: &ServiceSweepOptions) -> Result<(), Error> {
    crate::profile::validate_duration(options.duration_s)?;
    if options.services.is_empty() || options.modes.is_empty() {
        return Err(Error::InvalidArgument(
            "--services and --proxy-mode need at least one value each".to_owned(),
        ));
    }
    if let Some(&n) = options.services.iter().find(|&&n| n > MAX_SERVICES) {
        return Err(Error::InvalidArgument(format!(
            "--services {n} is too many: at most {MAX_SERVICES}"
        )));
    }
    Ok(())
}

/// Runs the sweep on a lab of its own, removed afterwards, also on failure.
pub async fn sweep(
    options: &ServiceSweepOptions,
    mut progress: impl FnMut(&str, bool),
) -> Result<ServiceSweepResult, Error> {
    validate_sweep(options)?;
    progress(&format!("{}: building the lab", options.model.name()), true);
    let lab = super::topology::up(options.model).await?;
    let result = sweep_on(&lab, options, &mut progress).await;
    let removed = super::topology::down().await;
    let result = result?;
    removed?;
    Ok(result)
}

async fn sweep_on(
    lab: &Lab,
    options: &ServiceSweepOptions,
    progress: &mut impl FnMut(&str, bool),
) -> Result<ServiceSweepResult, Error> {
    let server = lab.server(options.scenario).clone();
    let mut points = Vec::new();
    // Modes alternate at every count, so a drift of the machine does not favour one.
    for &count in &options.services {
        for &mode in &options.modes {
            let label = format!("{} {count} Services", mode.name());
            progress(&format!("{label}: installing"), true);
            let installed = install(lab, mode, count, server.ip, super::traffic::CRR_PORT)?;
            progress(&format!("{label}: connect-request-response"), true);
            let flamegraph = options
                .flamegraphs
                .as_ref()
                .map(|dir| dir.join(format!("{}-{count}.svg", mode.name())));
            let mut point =
                profiled_crr(lab, &server, options, &installed, flamegraph.as_deref()).await?;
            progress(&format!("{label}: stream"), true);
            let connect = if installed.mode == ProxyMode::None {
                server.ip
            } else {
                STREAM_SERVICE_IP
            };
            let stream_options = super::bench::stream_profile(
                lab,
                options.duration_s,
                &options.sampler,
                None,
                false,
            );
            let (stream, gbps) =
                super::bench::profiled_stream_to(lab, &server, connect, &stream_options, None)
                    .await?;
            point.stream_gbps = gbps;
            point.stream_netfilter_cpp = stream.component("netfilter").and_then(|c| c.cpp);
            progress(
                &format!(
                    "{label}: {:.0} conn/s, set-up p50 {:.0} us, {} rules per connection",
                    point.crr.connections_per_s,
                    point.crr.setup_p50_us,
                    point
                        .prerouting_rules_per_connection
                        .map_or_else(|| "-".to_owned(), |r| format!("{r:.0}"))
                ),
                false,
            );
            points.push(point);
        }
    }
    for host in [lab.host_netns(1), lab.host_netns(2)] {
        remove(&host)?;
    }
    let fits = options
        .modes
        .iter()
        .map(|&mode| {
            let of = |y: fn(&ServicePoint) -> Option<f64>| {
                let (xs, ys): (Vec<f64>, Vec<f64>) = points
                    .iter()
                    // Without Services the connections go straight to the pod, without
                    // DNAT: a cost of its own, not a point on the per-Service line.
                    .filter(|p| p.mode == mode && p.services > 0)
                    .filter_map(|p| y(p).map(|v| (f64::from(p.services), v)))
                    .unzip();
                super::sweep::fit(&xs, &ys)
            };
            ModeFit {
                mode,
                cycles_per_connection: of(|p| p.netfilter_cycles_per_connection),
                setup_p50_us: of(|p| Some(p.crr.setup_p50_us)),
            }
        })
        .collect();
    Ok(ServiceSweepResult {
        model: options.model.name().to_owned(),
        scenario: options.scenario.name().to_owned(),
        points,
        fits,
    })
}

/// One profiled connect-request-response run to the last Service (or straight to the pod
/// without Services).
async fn profiled_crr(
    lab: &Lab,
    server: &super::topology::Pod,
    options: &ServiceSweepOptions,
    installed: &Installed,
    flamegraph: Option<&std::path::Path>,
) -> Result<ServicePoint, Error> {
    use std::net::SocketAddrV4;
    let mut profile_options =
        super::bench::stream_profile(lab, options.duration_s, &options.sampler, None, true);
    profile_options.window.stacks = flamegraph.is_some();
    crate::profile::validate(&profile_options)?;
    let probes = crate::profile::start_probes(&profile_options)?;
    let mut window = crate::window::OpenWindow::open(&probes, &profile_options.window)?;
    let listen = SocketAddrV4::new(server.ip, super::traffic::CRR_PORT);
    let address = if installed.services > 0 && installed.mode != ProxyMode::None {
        SocketAddrV4::new(installed.target, SERVICE_PORT)
    } else {
        listen
    };
    let warm_up = std::time::Duration::from_millis(300);
    let run_for = warm_up + std::time::Duration::from_secs_f64(options.duration_s + 0.3);
    let (client_ns, server_ns) = (lab.client().netns.clone(), server.netns.clone());
    let crr = tokio::task::spawn_blocking(move || {
        super::traffic::connect_request_response(&client_ns, &server_ns, listen, address, run_for)
    });
    tokio::time::sleep(warm_up).await;
    window.restart(&probes)?;
    tokio::time::sleep(std::time::Duration::from_secs_f64(options.duration_s)).await;
    let mut breakdown = window.close(&probes)?;
    drop(probes);
    let crr = crr
        .await
        .map_err(|e| Error::InvalidArgument(format!("crr task: {e}")))??;
    if let Some(path) = flamegraph {
        super::bench::write_flamegraph(path, &breakdown)?;
        breakdown.stacks = None;
    }
    let connections = crr.connections_per_s * breakdown.window.duration_s;
    let per_connection = |v: f64| (connections > 0.0).then(|| v / connections);
    let client_host = lab.host_netns(lab.client().host);
    let prerouting = breakdown
        .netfilter
        .chains
        .iter()
        .filter(|c| c.netns == client_host && c.hook == "PREROUTING")
        .filter(|c| c.table == "nat" || c.table == "kube-proxy")
        .filter_map(|c| c.rules_evaluated)
        .max();
    Ok(ServicePoint {
        mode: installed.mode,
        services: installed.services,
        rules: installed.rules,
        install_s: installed.seconds,
        crr,
        total_cpp: breakdown.total.cpp,
        netfilter_cpp: breakdown.component("netfilter").and_then(|c| c.cpp),
        netfilter_cycles_per_connection: breakdown
            .component("netfilter")
            .and_then(|c| per_connection(c.cycles as f64)),
        prerouting_rules_per_connection: prerouting.and_then(|r| per_connection(r as f64)),
        stream_gbps: 0.0,
        stream_netfilter_cpp: None,
    })
}

/// The sweep for people: one line per point, then the slopes.
pub fn render_sweep(result: &ServiceSweepResult) -> String {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    table.set_header(vec![
        "mode",
        "Services",
        "rules/host",
        "install s",
        "conn/s",
        "set-up p50 us",
        "set-up p99 us",
        "rules/conn",
        "netfilter cycles/conn",
        "netfilter CPP",
        "total CPP",
        "stream Gbit/s",
        "stream netfilter CPP",
    ]);
    let show = |v: Option<f64>, d: usize| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.d$}"));
    for p in &result.points {
        table.add_row(vec![
            p.mode.name().to_owned(),
            p.services.to_string(),
            p.rules.to_string(),
            format!("{:.2}", p.install_s),
            format!("{:.0}", p.crr.connections_per_s),
            format!("{:.0}", p.crr.setup_p50_us),
            format!("{:.0}", p.crr.setup_p99_us),
            show(p.prerouting_rules_per_connection, 0),
            show(p.netfilter_cycles_per_connection, 0),
            show(p.netfilter_cpp, 1),
            show(p.total_cpp, 1),
            format!("{:.2}", p.stream_gbps),
            show(p.stream_netfilter_cpp, 1),
        ]);
    }
    let mut out = format!(
        "{} {}: connect-request-response to the last of N Services\n{table}\n",
        result.model, result.scenario
    );
    for fit in &result.fits {
        let line = |f: &Option<super::sweep::Fit>, unit: &str| {
            f.map_or_else(
                || "-".to_owned(),
                |f| format!("{:.3} {unit} per Service (R² {:.3})", f.slope, f.r_squared),
            )
        };
        let _ = writeln!(
            out,
            "{}: netfilter {}, set-up p50 {}",
            fit.mode.name(),
            line(&fit.cycles_per_connection, "cycles per connection"),
            line(&fit.setup_p50_us, "us")
        );
    }
    out
}

/// One measured figure of a sweep point.
type PointValue = fn(&ServicePoint) -> Option<f64>;

/// The sweep as an SVG chart: connection set-up p50 and netfilter cycles per connection
/// against the number of Services, a line per proxy mode.
pub fn svg(result: &ServiceSweepResult) -> String {
    let (panel_w, panel_h, left, top, gap) = (380.0, 240.0, 70.0, 40.0, 90.0);
    let width = left + 2.0 * panel_w + gap + 140.0;
    let height = top + panel_h + 60.0;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" \
         font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"18\" font-size=\"13\">Services: cost of a new connection ({} {}, connect-request-response to the last Service)</text>\n",
        result.model, result.scenario
    );
    let max_x = result
        .points
        .iter()
        .map(|p| f64::from(p.services))
        .fold(1.0, f64::max);
    let colour = |mode: ProxyMode| match mode {
        ProxyMode::Iptables => "#e15759",
        ProxyMode::Nftables => "#4e79a7",
        ProxyMode::None => "#79706e",
    };
    let panels: [(&str, PointValue); 2] = [
        ("connection set-up p50 (us)", |p| Some(p.crr.setup_p50_us)),
        ("netfilter cycles per connection", |p| {
            p.netfilter_cycles_per_connection
        }),
    ];
    for (index, (title, value)) in panels.iter().enumerate() {
        let x0 = left + index as f64 * (panel_w + gap);
        let max_y = result.points.iter().filter_map(value).fold(1.0, f64::max);
        let x = |v: f64| x0 + panel_w * v / max_x;
        let y = |v: f64| top + panel_h - panel_h * v / max_y;
        let _ = writeln!(
            out,
            "<text x=\"{x0:.0}\" y=\"{:.0}\" fill=\"#555\">{title}</text>\
             <line x1=\"{x0:.0}\" y1=\"{:.0}\" x2=\"{:.0}\" y2=\"{:.0}\" stroke=\"#999\"/>\
             <line x1=\"{x0:.0}\" y1=\"{top:.0}\" x2=\"{x0:.0}\" y2=\"{:.0}\" stroke=\"#999\"/>",
            top - 6.0,
            top + panel_h,
            x0 + panel_w,
            top + panel_h,
            top + panel_h
        );
        for tick in 0..=4 {
            let (vx, vy) = (max_x * f64::from(tick) / 4.0, max_y * f64::from(tick) / 4.0);
            let _ = writeln!(
                out,
                "<text x=\"{:.0}\" y=\"{:.0}\" text-anchor=\"end\">{vy:.0}</text>\
                 <text x=\"{:.0}\" y=\"{:.0}\" text-anchor=\"middle\">{vx:.0}</text>",
                x0 - 4.0,
                y(vy) + 4.0,
                x(vx),
                top + panel_h + 14.0
            );
        }
        let _ = writeln!(
            out,
            "<text x=\"{:.0}\" y=\"{:.0}\" text-anchor=\"middle\" fill=\"#555\">Services</text>",
            x0 + panel_w / 2.0,
            top + panel_h + 30.0
        );
        for fit in &result.fits {
            let points: Vec<(f64, f64)> = result
                .points
                .iter()
                .filter(|p| p.mode == fit.mode)
                .filter_map(|p| value(p).map(|v| (x(f64::from(p.services)), y(v))))
                .collect();
            let line: Vec<String> = points
                .iter()
                .map(|(a, b)| format!("{a:.1},{b:.1}"))
                .collect();
            let c = colour(fit.mode);
            let _ = writeln!(
                out,
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{c}\" stroke-width=\"2\"/>",
                line.join(" ")
            );
            for (a, b) in points {
                let _ = writeln!(
                    out,
                    "<circle cx=\"{a:.1}\" cy=\"{b:.1}\" r=\"3\" fill=\"{c}\"/>"
                );
            }
        }
    }
    let legend_x = width - 120.0;
    for (index, fit) in result.fits.iter().enumerate() {
        let ly = top + index as f64 * 18.0;
        let _ = writeln!(
            out,
            "<rect x=\"{legend_x:.0}\" y=\"{ly:.0}\" width=\"12\" height=\"12\" fill=\"{}\"/>\
             <text x=\"{:.0}\" y=\"{:.0}\">{}</text>",
            colour(fit.mode),
            legend_x + 18.0,
            ly + 10.0,
            fit.mode.name()
        );
    }
    out.push_str("</svg>\n");
    out
}
